"""Checking what a caller passes to :meth:`TRTEngine.infer <dfq_deploy.trt.engine.TRTEngine.infer>` and choosing
the optimisation profile it runs on (plain Python on NumPy arrays; torch CUDA tensors are checked in place).

The profile comes first because TensorRT needs it before the shapes: ``set_optimization_profile_async`` "must be
called before calling setInputShape()" (``IExecutionContext``, NvInferRuntime.h, release/10.3 and 11.1). The batch
of the first input picks it (:func:`~dfq_deploy.trt.profiles.choose_profile`); then every input is checked against
that profile's min and max shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from dfq_deploy.errors import DfqError
from dfq_deploy.trt.context import TensorInfo
from dfq_deploy.trt.profiles import BatchProfile, choose_profile
from dfq_deploy.trt.timing import check_input_shape

logger = logging.getLogger(__name__)


def is_torch_cuda(x: Any) -> bool:
    """A torch CUDA tensor (checked without importing torch)."""
    mod = type(x).__module__
    return mod.startswith("torch") and hasattr(x, "data_ptr") and getattr(x, "is_cuda", False)


def torch_dtype(dtype: np.dtype) -> Any:
    """The torch dtype of a NumPy dtype.

    Raises:
        DfqError: torch has none.
    """
    import torch

    table = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
             np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64, np.dtype(np.int8): torch.int8,
             np.dtype(np.uint8): torch.uint8, np.dtype(np.bool_): torch.bool}
    try:
        return table[np.dtype(dtype)]
    except KeyError as exc:
        raise DfqError(f"no torch dtype for {dtype}") from exc


def profile_table(inputs: Sequence[TensorInfo]) -> list[BatchProfile]:
    """``(min, opt, max)`` batch of the first input per profile index."""
    return [(p[0][0], p[1][0], p[2][0]) for p in inputs[0].profiles]


def check_feed(feed: dict[str, Any], inputs: Sequence[TensorInfo], device_index: int = 0) -> tuple[bool, int]:
    """Check names, shapes and dtypes of ``feed`` (in place: arrays as NumPy, device tensors made contiguous) and
    choose the profile.

    Args:
        feed: ``{input name: array or torch CUDA tensor}``.
        inputs: the engine's inputs, with their profiles.
        device_index: the engine's GPU (torch inputs must be on it).

    Returns:
        ``(torch CUDA inputs, profile index)``.

    Raises:
        DfqError: wrong names, a mix of host and device inputs, a batch no profile takes, shapes outside the
            chosen profile, wrong dtypes or device.
    """
    expected = {t.name for t in inputs}
    if set(feed) != expected:
        raise DfqError(f"engine inputs are {sorted(expected)}, got {sorted(feed)}")
    on_device = [is_torch_cuda(v) for v in feed.values()]
    if any(on_device) and not all(on_device):
        raise DfqError("mix of torch CUDA tensors and host arrays: pass all inputs on the same side")
    device_io = all(on_device)
    first = feed[inputs[0].name]
    shape = tuple(first.shape) if hasattr(first, "shape") else np.shape(first)
    profile = choose_profile(profile_table(inputs), int(shape[0]) if len(shape) else 1)
    for t in inputs:
        x = feed[t.name]
        lo, _, hi = t.profiles[profile]
        check_input_shape(t.name, tuple(x.shape) if hasattr(x, "shape") else np.shape(x), lo, hi)
        if device_io:
            if x.device.index is not None and x.device.index != device_index:
                raise DfqError(f"input '{t.name}' is on {x.device}, the engine runs on cuda:{device_index}")
            want = torch_dtype(t.dtype)
            if x.dtype != want:
                raise DfqError(f"input '{t.name}' is {x.dtype}, the engine expects {want}")
            if not x.is_contiguous():
                logger.debug("input '%s' is not contiguous: copying", t.name)
                feed[t.name] = x.contiguous()
        else:
            arr = np.asarray(x)
            if arr.dtype != t.dtype:
                raise DfqError(f"input '{t.name}' is {arr.dtype}, the engine expects {t.dtype}")
            feed[t.name] = arr
    return device_io, profile
