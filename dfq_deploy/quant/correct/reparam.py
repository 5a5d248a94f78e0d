"""Scale reparameterisation of post-LayerNorm activations for per-tensor INT8 (the RepQ-ViT idea).

Post-LayerNorm activations of trained ViTs have very different ranges per channel (a few channels are tens of
times wider than the rest), while TensorRT quantizes activations with one scale per tensor: the wide channels
set the scale and the narrow ones are left with a handful of levels. Per channel ``j`` of a LayerNorm output
``y`` consumed by a Linear ``W`` (``norm1 -> attn.qkv`` and ``norm2 -> mlp.fc1`` in every block), choose a
centre ``z_j`` and a scale ``s_j > 0`` and fold

    gamma' = gamma / s,   beta' = (beta - z) / s          (so the LayerNorm outputs y' = (y - z) / s)
    W'     = W diag(s),   b'    = b + W z                 (so W' y' + b' = W y + b)

The float model computes the same function (to rounding), the graph keeps its shape (only initializers
change), and the quantizer on the Linear's input now sees channels of similar range, so one per-tensor scale
suffices. The price is moved into the weights (column ``j`` scaled by ``s_j``), which per-output-channel weight
scales absorb only partly, hence SmoothQuant's migration strength ``alpha``:
``s_j = r_j^alpha / max_i |W_ij|^(1 - alpha)`` with ``r_j`` the half-range of channel ``j`` after centring;
``alpha = 1`` equalises the activation ranges completely (RepQ-ViT).

The centring ``z`` (the per-channel midpoint of the observed range, folded into ``beta`` and the Linear's bias)
matters for symmetric quantizers: post-LayerNorm channels are often far from zero-centred.

Apply it to the float model *before* weights and activations are calibrated.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from dfq_deploy.device import model_device
from dfq_deploy.quant.correct.capture import batches
from dfq_deploy.quant.qmodel import QuantLinear, quant_disabled, transformer_blocks

logger = logging.getLogger(__name__)


def layernorm_linear_pairs(model: nn.Module) -> list[tuple[str, nn.LayerNorm, nn.Linear]]:
    """``(name, LayerNorm, consuming Linear)`` for every ``norm1 -> attn.qkv`` and ``norm2 -> mlp.fc1``.

    Only pairs where the LayerNorm output feeds the Linear alone, through per-channel-preserving ops
    (ViT: directly; Swin: window partition/shift), are listed.
    """
    names = {id(m): n for n, m in model.named_modules()}
    pairs = []
    for block in transformer_blocks(model):
        for norm_name, lin in (("norm1", getattr(block.attn, "qkv", None)), ("norm2", getattr(block.mlp, "fc1", None))):
            norm = getattr(block, norm_name, None)
            if not (isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and norm.bias is not None):
                continue
            if not isinstance(lin, nn.Linear) or lin.in_features != norm.normalized_shape[-1]:
                continue
            pairs.append((names[id(norm)], norm, lin))
    return pairs


@torch.no_grad()
def reparam_layernorm_(
    model: nn.Module,
    images: torch.Tensor,
    alpha: float = 0.5,
    shift: bool = True,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Fold per-channel centres and scales of post-LayerNorm activations into LayerNorms and Linears, in place.

    Args:
        model: a timm ViT/DeiT/Swin in float, or prepared but not yet calibrated (quantizers are bypassed while
            observing; weight quantizers already calibrated are re-calibrated).
        images: calibration images in model space (the per-channel ranges are observed on them).
        alpha: migration strength in [0, 1] (0: scales from the weights only, 1: equalise activation ranges).
        shift: also centre each channel (needs a Linear bias).
        batch_size: images per forward pass.

    Returns:
        ``{"alpha", "shift", "layers": {norm name: {"range_ratio_before", "range_ratio_after"}}}`` where the
        range ratio is the widest channel's max ``|y|`` over the median channel's (after: of ``y'``).

    Raises:
        ValueError: ``alpha`` outside [0, 1], or an input quantizer that is already calibrated.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    pairs = layernorm_linear_pairs(model)
    for name, _, lin in pairs:
        iq = getattr(lin, "input_quantizer", None)
        if iq is not None and iq.calibrated:
            raise ValueError(f"{name}: activations are already calibrated: reparameterise before quantize()")
    lo: dict[int, torch.Tensor] = {}
    hi: dict[int, torch.Tensor] = {}

    def observe(i: int):
        def hook(_m: nn.Module, _a: Any, out: torch.Tensor) -> None:
            flat = out.detach().float().reshape(-1, out.shape[-1])
            mn, mx = flat.amin(0), flat.amax(0)
            lo[i] = mn if i not in lo else torch.minimum(lo[i], mn)
            hi[i] = mx if i not in hi else torch.maximum(hi[i], mx)

        return hook

    handles = [norm.register_forward_hook(observe(i)) for i, (_, norm, _) in enumerate(pairs)]
    was_training = model.training
    model.eval()
    try:
        with quant_disabled(model):
            for x in batches(images, batch_size, model_device(model)):
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    report: dict[str, Any] = {"alpha": alpha, "shift": shift, "layers": {}}
    for i, (name, norm, lin) in enumerate(pairs):
        if i not in lo:
            logger.warning("%s was not reached by the forward pass: left as is", name)
            continue
        z = (hi[i] + lo[i]) / 2 if shift and lin.bias is not None else torch.zeros_like(hi[i])
        r = torch.maximum(hi[i] - z, z - lo[i])
        r = r.clamp_min(1e-5 * float(r.max()) + 1e-12)
        w = lin.weight.detach().float()
        wmax = w.abs().amax(0).clamp_min(1e-8)
        s = r.pow(alpha) / wmax.pow(1.0 - alpha)
        s = s / torch.exp(torch.log(s).mean())  # geometric mean 1: only ratios matter
        norm.weight.copy_(norm.weight / s)
        norm.bias.copy_((norm.bias - z) / s)
        if lin.bias is not None:
            lin.bias.copy_(lin.bias + w @ z)
        lin.weight.copy_(w * s)
        wq = getattr(lin, "weight_quantizer", None)
        if isinstance(lin, QuantLinear) and wq is not None and wq.calibrated:
            wq.calibrate(lin.weight)
        before = torch.maximum(hi[i].abs(), lo[i].abs())
        after = r / s
        report["layers"][name] = {
            "range_ratio_before": float(before.max() / before.median()),
            "range_ratio_after": float(after.max() / after.median()),
        }
    logger.info("reparameterised %d LayerNorm -> Linear pairs (alpha %.2f)", len(report["layers"]), alpha)
    return report
