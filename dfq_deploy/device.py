"""Where the PyTorch work runs: ``--device {auto,cpu,cuda[:N]}``, and the numerics each stage allows there.

Synthesis, range calibration, corrections, reconstruction and the PyTorch side of the parity check run on the
device of the model; ONNX export and ONNX Runtime stay on the CPU. Calibration sets are CPU tensors (portable,
checkpointable); each stage moves its batches to the model's device.

Numerics: synthesis may use bf16 autocast and TF32 matmuls (:func:`synthesis_numerics`): it optimises images,
and its result is judged by the accuracy it gives. Everything the quantized model is fitted or checked with
(ranges, corrections, parity) runs in exact float32 (:func:`exact_float32`: TF32 off for matmuls and cuDNN
convolutions, as the patch embedding is a convolution and PyTorch allows TF32 there by default).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from dfq_deploy.config import DEVICE_CHOICES, SYNTH_PRECISIONS
from dfq_deploy.errors import DfqError

logger = logging.getLogger(__name__)

_CUDA_RE = re.compile(r"^cuda(?::(\d+))?$")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The ``torch.device`` for ``--device``.

    Args:
        spec: ``auto`` (CUDA when ``torch.cuda.is_available()``, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``;
            None means ``auto``.

    Raises:
        DfqError: an unknown spec, CUDA asked for where torch has none, or a GPU index that does not exist.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = "auto" if spec is None else str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    m = _CUDA_RE.match(spec)
    if m is None:
        raise DfqError(f"--device {spec}: use one of {', '.join(DEVICE_CHOICES)} or cuda:N")
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            why, fix = "this torch is a CPU-only build", "install a CUDA build of torch"
        else:
            why, fix = (f"torch (CUDA {torch.version.cuda}) finds no usable GPU or driver",
                        "check the GPU and its driver with nvidia-smi")
        raise DfqError(f"--device {spec}: CUDA is not available here ({why}): use --device cpu, or {fix}")
    index = int(m.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise DfqError(f"--device {spec}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); the CPU for a module without tensors."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def describe_device(device: torch.device) -> dict[str, Any]:
    """Name and memory of ``device``, for reports."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"device": str(device), "name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                "compute_capability": f"{props.major}.{props.minor}"}
    return {"device": "cpu", "threads": torch.get_num_threads()}


def default_synth_precision(device: torch.device) -> str:
    """``bf16`` on a CUDA GPU with native bf16 (compute capability >= 8.0), ``fp32`` elsewhere."""
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0):
        return "bf16"  # native bf16 (is_bf16_supported() also says yes for emulated bf16 on older GPUs)
    return "fp32"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """``bf16`` -> ``torch.bfloat16``; ``fp32`` -> None (no autocast)."""
    if precision not in SYNTH_PRECISIONS:
        raise DfqError(f"synthesis precision {precision!r}: use one of {', '.join(SYNTH_PRECISIONS)}")
    return torch.bfloat16 if precision == "bf16" else None


@contextlib.contextmanager
def _tf32(allow: bool) -> Iterator[None]:
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@contextlib.contextmanager
def synthesis_numerics(device: torch.device, precision: str) -> Iterator[None]:
    """TF32 matmuls allowed, and bf16 autocast when ``precision == "bf16"`` (on CPU and CUDA alike)."""
    dtype = autocast_dtype(precision)
    with _tf32(True), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        yield


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """No TF32 anywhere: what ranges, corrections and parity are computed with."""
    with _tf32(False):
        yield


def peak_memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak memory torch allocated on a CUDA device since :func:`peak_memory_reset` (None on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return None


def synchronize(device: torch.device) -> None:
    """Wait for the device (for timing); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
