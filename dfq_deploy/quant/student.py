"""The fake-quant student of dfqvit's hard stage: a quantized copy of the model, ranges refitted on images.

Registered with :func:`dfq_deploy.synth.dfqvit.register_student` (synthesis never imports quantization; this
module, imported with :mod:`dfq_deploy.quant`, plugs it in).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dfq_deploy.config import QuantConfig
from dfq_deploy.quant.qmodel import (
    act_quantizers,
    batches_loop,
    calibrate_activations_,
    calibrate_weights_,
    prepare_,
    set_quant_enabled_,
)
from dfq_deploy.synth.dfqvit import register_student


@register_student("fake-quant")
class QuantStudent:
    """A quantized copy of a model for the hard stage: weights quantized once, activation ranges (re)fitted on
    given images (simulated fake quantization, no correction: the student only has to rank the images).

    Args:
        model: the full-precision model (copied; the original is not touched).
        config: the quantization.
    """

    def __init__(self, model: nn.Module, config: QuantConfig) -> None:
        self.config = config
        self.model = prepare_(copy.deepcopy(model).eval(), config)
        calibrate_weights_(self.model)
        set_quant_enabled_(self.model, True)
        self.quantizers = [q for _, q in act_quantizers(self.model)]

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor) -> torch.Tensor:
        """Fit the activation ranges on ``images``; returns the scales (for checkpoints): ``[n]``, or ``[2, n]``
        (scales, zero points) on an asymmetric grid."""
        if not self.quantizers:
            return torch.zeros(0)
        calibrate_activations_(self.model, batches_loop(images, batch_size=len(images)),
                               sequential=self.config.a_calib == "sequential")
        scales = torch.stack([q.scale.reshape(()) for q in self.quantizers])
        if not any(q.asymmetric for q in self.quantizers):
            return scales
        zero = torch.zeros((), device=scales.device)
        return torch.stack([scales, torch.stack([q.zero_point.reshape(()) if q.asymmetric else zero
                                                 for q in self.quantizers])])

    def load_scales(self, scales: torch.Tensor) -> None:
        """Set the activation scales (and zero points) saved by :meth:`calibrate`."""
        device = next(self.model.parameters()).device
        zero_points = scales[1] if scales.dim() == 2 else None
        for i, (q, s) in enumerate(zip(self.quantizers, scales[0] if scales.dim() == 2 else scales, strict=True)):
            q.scale = s.to(device, copy=True)
            if q.asymmetric and zero_points is not None:
                q.zero_point = zero_points[i].to(device, copy=True)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def differentiable(self, images: torch.Tensor) -> torch.Tensor:
        """Logits with a (straight-through) gradient to ``images``."""
        return self.model(images)
