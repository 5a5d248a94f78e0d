"""The calibration-source registry and the data that flows out of it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfq_deploy.registry import Registry


@dataclass
class CalibRequest:
    """What a calibration source is asked for.

    Attributes:
        num_samples: images to produce.
        seed: RNG seed; the same request gives the same images.
        data_cfg: the model's timm data config (input size, mean, std).
        calib_dir: ImageFolder directory, for sources that read real images.
        options: source-specific settings (iterations, loss weights, ...).
    """

    num_samples: int
    seed: int
    data_cfg: dict[str, Any]
    calib_dir: str | Path | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.data_cfg["input_size"])  # type: ignore[return-value]


@dataclass
class CalibSet:
    """Calibration images in normalised model space, with optional (soft) targets and metadata."""

    images: torch.Tensor
    targets: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)


Source = Callable[[nn.Module, CalibRequest], CalibSet]
#: The one registry of calibration sources (``--calib NAME``): data-free methods, ``noise`` and ``real``.
SOURCES: Registry[Source] = Registry("calibration source")


def register_synthesizer(name: str) -> Callable[[Source], Source]:
    """Register a calibration source under ``name`` (selectable with ``--calib name``)."""
    return SOURCES.register(name)


def get_source(name: str) -> Source:
    return SOURCES.get(name)
