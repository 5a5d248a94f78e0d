"""Fake-quantization modules and range search.

All quantizers are symmetric with zero point 0 and a signed grid ``[-2^(b-1), 2^(b-1)-1]``, so the
quantized values are exactly what a TensorRT-style ``QuantizeLinear``/``DequantizeLinear`` pair computes:
``clamp(round(x / scale)) * scale`` with round-half-to-even (``torch.round`` and ONNX agree).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Values kept per activation quantizer for percentile / MSE range search.
RESERVOIR = 1 << 20
_CLIP_CANDIDATES = 80
_MSE_SAMPLES = 1 << 16
OBSERVER_SEED = 1234  # seed of each activation quantizer's reservoir sampling


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer range of a ``bits``-bit grid."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``clamp(round(x / scale), qmin, qmax) * scale``; a straight-through gradient when ``x`` needs one."""
    qmin, qmax = qrange(bits)
    q = torch.clamp(torch.round(x / scale), qmin, qmax) * scale
    if x.requires_grad:
        return x + (q - x).detach()
    return q


def quant_int(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The integers ``clamp(round(x / scale))`` that a deployed graph stores."""
    qmin, qmax = qrange(bits)
    return torch.clamp(torch.round(x / scale), qmin, qmax)


def search_scale(x: torch.Tensor, bits: int, method: str, percentile: float = 99.99) -> torch.Tensor:
    """Scale(s) for ``x`` grouped along its last dim: x is ``[..., n]`` and one scale per leading index.

    Args:
        x: values, the last dimension holds one group (a channel, a block, or all samples of a tensor).
        bits: grid bits.
        method: ``minmax`` (max |x|), ``percentile`` (that percentile of |x|) or ``mse`` (the clipping
            ratio of max |x| that minimises the squared quantization error, searched per group).
        percentile: used by ``percentile``.

    Returns:
        Strictly positive scales of shape ``x.shape[:-1]``.
    """
    x = x.detach().float()
    qmax = qrange(bits)[1]
    amax = x.abs().amax(-1)
    if method == "percentile":
        k = max(1, min(x.shape[-1], math.ceil(x.shape[-1] * percentile / 100.0)))
        amax = x.abs().kthvalue(k, dim=-1).values
    elif method == "mse":
        best_err = torch.full_like(amax, float("inf"))
        best = amax.clone()
        for ratio in torch.linspace(1.0, 0.2, _CLIP_CANDIDATES):
            clip = amax * ratio
            scale = (clip / qmax).clamp_min(1e-12).unsqueeze(-1)
            err = (fake_quant(x, scale, bits) - x).pow(2).mean(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, clip, best)
        amax = best
    elif method != "minmax":
        raise ValueError(f"unknown range method {method}")
    return (amax / qmax).clamp_min(1e-8)


class WeightQuantizer(nn.Module):
    """Per-output-channel or blockwise weight quantizer for a ``[out, in]`` Linear weight.

    Args:
        bits: grid bits (a 2/3-bit grid is stored in an INT4 container on export).
        block_size: None for per-channel; otherwise the number of input elements per block.
        method: range search method.
    """

    def __init__(self, bits: int, block_size: int | None = None, method: str = "mse") -> None:
        super().__init__()
        self.bits = bits
        self.block_size = block_size
        self.method = method
        self.enabled = True
        self.register_buffer("scale", torch.empty(0), persistent=True)

    @property
    def calibrated(self) -> bool:
        return self.scale.numel() > 0

    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        if self.block_size is None:
            return w
        out, inp = w.shape
        return w.reshape(out, inp // self.block_size, self.block_size)

    @torch.no_grad()
    def calibrate(self, w: torch.Tensor) -> None:
        """Choose scales for weight ``w`` (shape ``[out, in]``)."""
        if self.block_size is not None and w.shape[1] % self.block_size:
            raise ValueError(f"block size {self.block_size} does not divide the input dim {w.shape[1]}")
        self.scale = search_scale(self._grouped(w), self.bits, self.method)

    def full_scale(self, w: torch.Tensor) -> torch.Tensor:
        """Scales broadcast to ``w``'s shape grouping (``[out, 1]`` or ``[out, nblocks, 1]``)."""
        return self.scale.unsqueeze(-1)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled or not self.calibrated:
            return w
        return fake_quant(self._grouped(w), self.full_scale(w), self.bits).reshape(w.shape)

    def integers(self, w: torch.Tensor) -> torch.Tensor:
        """Integer weights, same shape as ``w``."""
        return quant_int(self._grouped(w), self.full_scale(w), self.bits).reshape(w.shape)

    def extra_repr(self) -> str:
        gran = "per_channel" if self.block_size is None else f"block={self.block_size}"
        return f"bits={self.bits}, {gran}, method={self.method}"


class ActQuantizer(nn.Module):
    """Per-tensor symmetric activation quantizer with an observing phase.

    In ``observing`` mode the input passes through unchanged while its running max and a random reservoir of
    values are recorded; :meth:`finalize` then picks the scale.

    Args:
        bits: grid bits.
        method: ``minmax``, ``percentile`` or ``mse``.
        percentile: for ``percentile``.
        log2: use a log2 grid for non-negative inputs (softmax outputs; simulation only, not deployable).
    """

    def __init__(self, bits: int, method: str = "percentile", percentile: float = 99.99, log2: bool = False) -> None:
        super().__init__()
        self.bits = bits
        self.method = method
        self.percentile = percentile
        self.log2 = log2
        self.enabled = True
        self.observing = False
        self.register_buffer("scale", torch.empty(0), persistent=True)
        self._samples: list[torch.Tensor] = []
        self._count = 0
        self._amax = 0.0
        self._gen: torch.Generator | None = None

    @property
    def calibrated(self) -> bool:
        return self.scale.numel() > 0

    def reset_observer(self) -> None:
        self._samples, self._count, self._amax = [], 0, 0.0
        self._gen = None

    def _observer_gen(self) -> torch.Generator:
        """This quantizer's own sampling generator, fresh for each observing phase, so that the scale depends
        only on the values this quantizer saw (not on what other quantizers or earlier runs drew)."""
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(OBSERVER_SEED)
        return self._gen

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1)
        self._amax = max(self._amax, float(flat.abs().max()))
        take = min(flat.numel(), RESERVOIR // 8)
        if take < flat.numel():
            flat = flat[torch.randint(0, flat.numel(), (take,), generator=self._observer_gen())]
        self._samples.append(flat)
        self._count += flat.numel()
        if self._count > 2 * RESERVOIR:  # thin the reservoir
            allv = torch.cat(self._samples)
            self._samples = [allv[torch.randperm(allv.numel(), generator=self._observer_gen())[:RESERVOIR]]]
            self._count = RESERVOIR

    @torch.no_grad()
    def finalize(self) -> None:
        """Pick the scale from what was observed and stop observing."""
        if not self._samples:
            raise RuntimeError("activation quantizer saw no data: the forward loop did not reach it")
        values = torch.cat(self._samples)
        if self.method == "mse" and values.numel() > _MSE_SAMPLES:  # the MSE search needs far fewer values
            extremes = torch.stack([values.min(), values.max()])
            values = torch.cat([values[torch.randperm(values.numel(), generator=self._observer_gen())[:_MSE_SAMPLES]],
                                extremes])
        if self.log2:
            self.scale = torch.ones((), device=values.device)
        else:
            scale = search_scale(values.unsqueeze(0), self.bits, self.method, self.percentile)[0]
            self.scale = scale.reshape(())
        self.observing = False
        self.reset_observer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
            return x
        if not self.enabled or not self.calibrated:
            return x
        if self.log2:
            levels = (1 << self.bits) - 1
            e = torch.clamp(torch.round(-torch.log2(x.clamp_min(1e-20))), 0, levels)
            q = torch.where(e >= levels, torch.zeros_like(x), torch.pow(2.0, -e))
            return x + (q - x).detach() if x.requires_grad else q
        return fake_quant(x, self.scale, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, method={self.method}{', log2' if self.log2 else ''}"

