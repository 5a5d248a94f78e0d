"""Per-call engine timings and their summaries, and the input-shape check against a profile (plain Python)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dfq_deploy.errors import DfqError


def check_input_shape(
    name: str, shape: Sequence[int], min_shape: Sequence[int], max_shape: Sequence[int]
) -> None:
    """Raise when ``shape`` is outside one optimisation profile ``[min_shape, max_shape]`` of the engine.

    Raises:
        DfqError: wrong rank, or a dimension outside the profile (the message gives the rebuild flag).
    """
    shape, lo, hi = tuple(int(v) for v in shape), tuple(min_shape), tuple(max_shape)
    if len(shape) != len(lo):
        raise DfqError(f"input '{name}' has shape {list(shape)}, the engine expects rank {len(lo)} "
                       f"({list(lo)} .. {list(hi)})")
    if shape[1:] != lo[1:] and lo[1:] == hi[1:]:
        dims = ", ".join(map(str, lo[1:]))
        raise DfqError(f"input '{name}' has shape {list(shape)}, the engine expects [N, {dims}]: preprocess "
                       "to the model's input size")
    if any(not (a <= s <= b) for s, a, b in zip(shape, lo, hi, strict=True)):
        raise DfqError(f"input '{name}' has batch {shape[0]}, outside the engine's profile {lo[0]}..{hi[0]}: "
                       f"split the batch or rebuild with --batch covering {shape[0]}")


@dataclass(frozen=True)
class InferTiming:
    """Times of one :meth:`TRTEngine.infer` call, in milliseconds.

    Attributes:
        batch: batch size of the call.
        h2d_ms: host-to-device copy (CUDA events; 0 for device inputs).
        compute_ms: the engine's GPU time (CUDA events around ``execute_async_v3``).
        d2h_ms: device-to-host copy (CUDA events; 0 for device outputs).
        wall_ms: host wall clock of the whole call, including staging into pinned memory.
    """

    batch: int
    h2d_ms: float
    compute_ms: float
    d2h_ms: float
    wall_ms: float

    @property
    def gpu_ms(self) -> float:
        """Copies plus compute."""
        return self.h2d_ms + self.compute_ms + self.d2h_ms


def summarize_timings(timings: Sequence[InferTiming], skip: int = 0) -> dict[str, Any]:
    """Mean / median / p90 / p99 of each timing field and throughputs over a list of calls.

    Args:
        timings: e.g. :attr:`TRTEngine.timing_history`.
        skip: leading calls to ignore (warm-up).

    Returns:
        ``{"calls", "images", "<field>": {"mean", "median", "p90", "p99"}, "images_per_s_compute",
        "images_per_s_wall"}``.

    Raises:
        DfqError: no calls left after ``skip``.
    """
    rows = list(timings)[skip:]
    if not rows:
        raise DfqError(f"no timed calls to summarise (got {len(timings)}, skipping {skip})")
    out: dict[str, Any] = {"calls": len(rows), "images": int(sum(t.batch for t in rows))}
    for f in ("h2d_ms", "compute_ms", "d2h_ms", "wall_ms", "gpu_ms"):
        v = np.array([getattr(t, f) for t in rows], dtype=np.float64)
        out[f] = {"mean": float(v.mean()), "median": float(np.median(v)), "p90": float(np.percentile(v, 90)),
                  "p99": float(np.percentile(v, 99))}
    compute = sum(t.compute_ms for t in rows)
    wall = sum(t.wall_ms for t in rows)
    out["images_per_s_compute"] = 1000.0 * out["images"] / compute if compute > 0 else float("nan")
    out["images_per_s_wall"] = 1000.0 * out["images"] / wall if wall > 0 else float("nan")
    return out

