"""Stages of a synthesis run and the learning-rate schedule (cosine with warm-up, restartable).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """A named span ``[start, end)`` of iterations; ``restart_lr`` starts a new warm-up + cosine cycle."""

    name: str
    start: int
    end: int
    restart_lr: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stage_at(stages: list[Stage], it: int) -> Stage:
    for s in stages:
        if s.start <= it < s.end:
            return s
    return stages[-1]


def lr_at(stages: list[Stage], it: int, base: float, warmup: float) -> float:
    """Learning rate at 0-based iteration ``it``: linear warm-up then cosine decay to 0 within each cycle.

    A cycle starts at iteration 0 and at every stage with ``restart_lr`` and ends where the next one starts.
    """
    starts = sorted({0, *(s.start for s in stages if s.restart_lr)})
    end_total = stages[-1].end
    start = max(s for s in starts if s <= it)
    later = [s for s in starts if s > start]
    length = (later[0] if later else end_total) - start
    t = it - start
    warm = int(round(warmup * length))
    if t < warm:
        return base * (t + 1) / warm
    span = max(1, length - warm)
    return base * 0.5 * (1.0 + math.cos(math.pi * (t - warm) / span))
