"""Optimisation profiles per batch size: which profiles a build makes, and which one a call runs on (plain Python).

What NVIDIA documents, and what dfq-deploy does with it:

* Kernels are chosen for a profile's opt shape: "The builder selects the kernels that result in the lowest runtime
  for the optimum input tensor dimensions, and are valid for all input tensor sizes in the valid range between
  minimum and maximum dimensions" (``IOptimizationProfile``, TensorRT 10.x and 11.4 Python API,
  https://docs.nvidia.com/deeplearning/tensorrt/11.4.0/_static/python-api/infer/Core/OptimizationProfile.html).
  One ``1..32`` profile tuned at 8 runs batch 1 on batch-8 kernels, so ``build --batch 1,8,32`` makes one profile per
  size with ``min = opt = max`` (:func:`batch_profiles`), tuned for exactly the batch that runs.
* A range is still kept, as the last profile (``min..max`` of the sizes, opt the middle size): without it a batch
  that is not one of the sizes (a short last batch of a dataset, a server's odd batch) could not run at all.
  ``--no-range-profile`` leaves it out. Every extra profile is tuned on its own, so builds take longer, and "if
  more than a single optimization profile is defined, users may set a target how much additional weight space
  should be maximally allocated to each additional profile" (same page): the engine may grow too.
* A call runs on one profile of its context: ``set_optimization_profile_async(profile_index, stream_handle)`` must
  come before ``set_input_shape`` (``IExecutionContext::setOptimizationProfileAsync``, NvInferRuntime.h at
  release/10.3 and 11.1), so the engine picks the profile first (:func:`choose_profile`): the one tuned for the
  call's batch, else the narrowest that contains it, else one line saying which batches the engine takes.
* Profiles are numbered in the order ``IBuilderConfig.add_optimization_profile`` received them (it returns the
  index); ``ICudaEngine.num_optimization_profiles`` and ``get_tensor_profile_shape(name, profile_index)`` read them
  back (TensorRT 10.3 and 11.1 Python bindings, ``pyCore.cpp``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from dfq_deploy.errors import DfqError

logger = logging.getLogger(__name__)

#: ``(min, opt, max)`` batch of one profile.
BatchProfile = tuple[int, int, int]

DEFAULT_BATCH_SIZES = (1, 8, 32)


def parse_batch_sizes(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"1,8,32"`` (or ``[1, 8, 32]``) -> ``(1, 8, 32)``: sorted, each size once.

    Raises:
        DfqError: not positive integers (the message gives an example).
    """
    if isinstance(text, str):
        try:
            vals = [int(v) for v in text.replace(" ", "").split(",") if v]
        except ValueError as exc:
            raise DfqError(f"--batch {text!r}: expected batch sizes, e.g. 1,8,32") from exc
    else:
        vals = [int(v) for v in text]
    if not vals or any(v < 1 for v in vals):
        raise DfqError(f"--batch {text!r}: expected positive batch sizes, e.g. 1,8,32")
    return tuple(sorted(set(vals)))


def batch_profiles(sizes: Sequence[int], range_profile: bool = True) -> list[BatchProfile]:
    """The profiles a build makes for ``sizes``: one exact profile per size, then the range (module docstring).

    Args:
        sizes: batch sizes (:func:`parse_batch_sizes`).
        range_profile: add ``min(sizes)..max(sizes)`` (opt: the middle size) as the last profile, when the sizes
            are not all one.

    Returns:
        ``(min, opt, max)`` per profile, in profile-index order.
    """
    sizes = parse_batch_sizes(sizes)
    out: list[BatchProfile] = [(b, b, b) for b in sizes]
    if range_profile and len(sizes) > 1:
        out.append((sizes[0], sizes[len(sizes) // 2], sizes[-1]))
    return out


def _width(p: BatchProfile) -> int:
    return p[2] - p[0]


def choose_profile(profiles: Sequence[Sequence[int]], batch: int) -> int:
    """Index of the profile a call of ``batch`` images runs on.

    The profile whose opt batch is ``batch`` (of several, the narrowest, then the first); else the narrowest
    profile that contains ``batch`` (then the one whose opt is closest, then the first). An engine with one
    profile (any build before per-batch profiles) always gets 0 when the batch fits.

    Args:
        profiles: ``(min, opt, max)`` batch per profile index, e.g. :attr:`TRTEngine.profiles
            <dfq_deploy.trt.engine.TRTEngine.profiles>` or the ``profiles`` of a build record.
        batch: the call's batch size.

    Raises:
        DfqError: no profile contains ``batch`` (one line naming what the engine takes and the rebuild flag).
    """
    table = [(int(p[0]), int(p[1]), int(p[2])) for p in profiles]
    if not table:
        raise DfqError("the engine has no optimisation profile")
    tuned = [i for i, p in enumerate(table) if p[1] == batch]
    if tuned:
        return min(tuned, key=lambda i: (_width(table[i]), i))
    inside = [i for i, p in enumerate(table) if p[0] <= batch <= p[2]]
    if inside:
        return min(inside, key=lambda i: (_width(table[i]), abs(table[i][1] - batch), i))
    raise DfqError(f"batch {batch} is outside the engine's profiles ({describe_profiles(table)}): split the batch "
                   f"or rebuild with --batch covering {batch}")


def describe_profiles(profiles: Sequence[Sequence[int]]) -> str:
    """``[(1, 1, 1), (8, 8, 8), (1, 8, 32)]`` -> ``"batch 1, batch 8, batch 1..32 (opt 8)"``."""
    parts = []
    for lo, opt, hi in profiles:
        parts.append(f"batch {lo}" if lo == hi else f"batch {lo}..{hi} (opt {opt})")
    return ", ".join(parts)


def batch_envelope(profiles: Sequence[Sequence[int]]) -> BatchProfile:
    """``(smallest min, opt of the widest profile, largest max)`` over all profiles.

    For an engine with one profile this is that profile; with per-batch profiles and a range it is the range.
    """
    table = [(int(p[0]), int(p[1]), int(p[2])) for p in profiles]
    if not table:
        raise DfqError("the engine has no optimisation profile")
    widest = max(range(len(table)), key=lambda i: (_width(table[i]), -i))
    return min(p[0] for p in table), table[widest][1], max(p[2] for p in table)
