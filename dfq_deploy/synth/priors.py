"""Image priors and target losses shared by the synthesizers: total variation, soft cross-entropy, the valid
pixel range.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean over images of the squared differences between neighbouring pixels in 4 directions.

    Each direction contributes the mean of its squared differences over channels and pixels, so the value
    does not depend on the image size (Gaussian noise gives about 8).
    """
    diffs = (
        x[..., :, 1:] - x[..., :, :-1],
        x[..., 1:, :] - x[..., :-1, :],
        x[..., 1:, 1:] - x[..., :-1, :-1],
        x[..., 1:, :-1] - x[..., :-1, 1:],
    )
    per_image = sum(d.pow(2).flatten(1).mean(1) for d in diffs)
    return per_image.mean()  # type: ignore[union-attr]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy against probability targets: ``-(t * log_softmax(z)).sum(-1)``."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1)


def valid_range(data_cfg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel bounds ``((0 - mean) / std, (1 - mean) / std)`` of normalised images, shaped (1, C, 1, 1)."""
    mean = torch.tensor(data_cfg["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(data_cfg["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return (0.0 - mean) / std, (1.0 - mean) / std
