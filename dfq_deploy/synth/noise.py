"""``noise``: standard Gaussian images in normalised space, the data-free lower bound."""

from __future__ import annotations

import torch
from torch import nn

from dfq_deploy.synth.base import CalibRequest, CalibSet, register_synthesizer


@register_synthesizer("noise")
def gaussian_noise(model: nn.Module, req: CalibRequest) -> CalibSet:
    gen = torch.Generator().manual_seed(req.seed)
    images = torch.randn((req.num_samples, *req.input_size), generator=gen)
    return CalibSet(images, meta={"source": "noise", "seed": req.seed})
