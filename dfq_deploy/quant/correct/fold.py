"""Pending per-layer corrections of a :class:`~dfq_deploy.quant.qmodel.QuantLinear`, and folding them away.

A correction of one quantized Linear ``y = Q_w(W) Q_a(x) + b`` has two parts, placed where they fold exactly:

* **input side** ``a -> M a + c`` (``M`` full ``[d_in, d_in]`` or diagonal), acting on the *dequantized* input
  ``a = Q_a(x)``. The ``Q/DQ`` pair sits on the Linear's input, so a correction placed before it would change
  what is quantized and could not be folded anywhere without an extra op; placed after it, it is a linear map
  between the ``DequantizeLinear`` and the MatMul, i.e. part of the weight:
  ``W (M a + c) + b = (W M) a + (b + W c)``. The integer weights are then those of ``W M``: the weight
  quantizer is re-calibrated on ``W M`` when the correction is attached, and while the correction is pending the
  layer quantizes ``W M`` on the fly, so the pending and the folded model compute the same thing.
* **output side** ``y -> s * y + t`` per output channel (``s > 0``). With per-output-channel (or blocked)
  symmetric weight scales ``delta``, ``Q(s_i w_i; s_i delta_i) = s_i Q(w_i; delta_i)`` exactly (same integers,
  including the clamp), so the output scale folds into the weight rows *and* their scales without
  re-quantization, and ``t`` into the bias: ``W <- diag(s) W``, ``delta <- s delta``, ``b <- s b + t``.
  (In float, ``(s w) / (s delta)`` can land one ulp across a rounding tie; the rare such weight is snapped onto
  its grid point, so the stored integers are exactly the pending ones.)

After :func:`fold_corrections_` the model is a plain fake-quant model (no extra modules or ops), whose float
graph exports to the same QDQ ONNX shape as the uncorrected one.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from dfq_deploy.quant.qmodel import QuantLinear, quant_linears

logger = logging.getLogger(__name__)


class LinearCorrection(nn.Module):
    """Pending correction of one QuantLinear; every part is optional (None means identity / zero).

    Attributes:
        in_matrix: ``M`` ``[d_in, d_in]``: the dequantized input ``a`` becomes ``M a``.
        in_scale: diagonal ``M`` as a ``[d_in]`` vector (exclusive with ``in_matrix``).
        in_bias: ``c`` ``[d_in]`` added to the (mapped) input.
        out_scale: ``s`` ``[d_out]``, strictly positive, multiplies the output.
        out_bias: ``t`` ``[d_out]`` added to the output.
    """

    in_matrix: torch.Tensor | None
    in_scale: torch.Tensor | None
    in_bias: torch.Tensor | None
    out_scale: torch.Tensor | None
    out_bias: torch.Tensor | None

    def __init__(
        self,
        in_matrix: torch.Tensor | None = None,
        in_scale: torch.Tensor | None = None,
        in_bias: torch.Tensor | None = None,
        out_scale: torch.Tensor | None = None,
        out_bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if in_matrix is not None and in_scale is not None:
            raise ValueError("give in_matrix or in_scale, not both")
        if out_scale is not None and not bool((out_scale > 0).all()):
            raise ValueError("out_scale must be strictly positive to fold into symmetric weight scales")
        for name, value in (("in_matrix", in_matrix), ("in_scale", in_scale), ("in_bias", in_bias),
                            ("out_scale", out_scale), ("out_bias", out_bias)):
            self.register_buffer(name, None if value is None else value.detach().float().clone())

    @property
    def has_input(self) -> bool:
        return self.in_matrix is not None or self.in_scale is not None or self.in_bias is not None

    @property
    def needs_bias(self) -> bool:
        return self.in_bias is not None or self.out_bias is not None

    def input_folded(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W M, b + W c)``: the float weight and bias with the input-side part folded in."""
        w = weight
        if self.in_matrix is not None:
            w = weight @ self.in_matrix
        elif self.in_scale is not None:
            w = weight * self.in_scale
        b = bias
        if self.in_bias is not None:
            assert bias is not None
            b = bias + weight @ self.in_bias
        return w, b

    def apply_output(self, y: torch.Tensor) -> torch.Tensor:
        """``s * y + t``."""
        if self.out_scale is not None:
            y = y * self.out_scale
        if self.out_bias is not None:
            y = y + self.out_bias
        return y


@torch.no_grad()
def attach_correction_(lin: QuantLinear, corr: LinearCorrection, recalibrate: bool = True) -> QuantLinear:
    """Give ``lin`` a pending correction (it must not have one already: fold that first).

    Args:
        lin: the layer.
        corr: its correction.
        recalibrate: re-choose the weight scales for ``W M`` when the correction has an input matrix/scale
            (the weights that will be deployed); output-side parts never need it.

    Raises:
        ValueError: the layer already has a pending correction, or the correction adds a bias the layer lacks
            (a new bias would add an op to the exported graph).
    """
    if getattr(lin, "correction", None) is not None:
        raise ValueError("layer already has a pending correction: fold it first")
    if corr.needs_bias and lin.bias is None:
        raise ValueError("correction needs a bias but the layer has none (it would add an op on export)")
    lin.correction = corr
    if recalibrate and lin.weight_quantizer is not None and (corr.in_matrix is not None or corr.in_scale is not None):
        w, _ = corr.input_folded(lin.weight.detach(), lin.bias)
        lin.weight_quantizer.calibrate(w)
    return lin


@torch.no_grad()
def fold_linear_(lin: QuantLinear) -> bool:
    """Fold ``lin``'s pending correction into its weight, bias and weight scales; False when there was none."""
    corr: LinearCorrection | None = getattr(lin, "correction", None)
    if corr is None:
        return False
    w, b = corr.input_folded(lin.weight.detach().float(), None if lin.bias is None else lin.bias.detach().float())
    if corr.out_scale is not None:
        s = corr.out_scale
        wq = lin.weight_quantizer
        # NVFP4: a per-channel factor cannot ride on FP8 block scales exactly (they must stay FP8 values times the
        # global scale), so the folded weight is quantized afresh; every other grid keeps its integers
        nvfp4 = wq is not None and getattr(wq, "fmt", "int") == "nvfp4"
        ints = wq.integers(w) if wq is not None and wq.calibrated and not nvfp4 else None
        w = w * s[:, None]
        b = None if b is None else b * s
        if nvfp4 and wq.calibrated:
            wq.calibrate(w)
        if wq is not None and ints is not None:  # same integers: Q(s w; s delta) = s Q(w; delta)
            wq.scale = wq.scale * (s if wq.scale.ndim == 1 else s[:, None])
            # (s w) / (s delta) can land one ulp on the other side of a rounding tie: snap those few weights
            # onto their grid point so that the stored integers are exactly the pending ones
            flipped = wq.integers(w) != ints
            if bool(flipped.any()):
                grid = (wq._grouped(ints) * wq.full_scale(w)).reshape(w.shape)
                w = torch.where(flipped, grid, w)
    if corr.out_bias is not None:
        assert b is not None
        b = b + corr.out_bias
    lin.weight.copy_(w)
    if b is not None:
        lin.bias.copy_(b)
    lin.correction = None
    return True


def fold_corrections_(model: nn.Module) -> int:
    """Fold every pending correction of ``model`` in place; returns how many layers were folded.

    The result is a plain fake-quant model: only ``weight``, ``bias`` and weight-quantizer scales of the
    corrected QuantLinears change, so the exported QDQ graph has the same nodes as without corrections.
    """
    n = sum(fold_linear_(lin) for _, lin in quant_linears(model))
    logger.info("folded %d corrections", n)
    return n


def pending_corrections(model: nn.Module) -> list[str]:
    """Names of the QuantLinears that still carry a pending correction."""
    return [name for name, lin in quant_linears(model) if getattr(lin, "correction", None) is not None]
