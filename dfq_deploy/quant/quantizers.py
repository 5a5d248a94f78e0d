"""Fake-quantization modules and range search.

Weight quantizers, and activation quantizers by default, are symmetric with zero point 0 and a signed grid
``[-2^(b-1), 2^(b-1)-1]``, so the quantized values are exactly what a TensorRT-style
``QuantizeLinear``/``DequantizeLinear`` pair computes: ``clamp(round(x / scale)) * scale`` with
round-half-to-even (``torch.round`` and ONNX agree).

Two activation grids exist for research presets only (no deployable kernel: TensorRT requires zero point 0):

* ``asymmetric``: a uniform affine grid ``[0, 2^b - 1]`` with a zero point, ``(clamp(round(x / s) + z) - z) * s``,
  whose range ``[lo, hi]`` follows the values; a non-negative tensor (softmax, most of GELU) gets every level
  instead of half of them (the papers' uniform quantizer, SPDFQ Eq. 1).
* ``log2`` (softmax outputs): ``2^-round(-log2 x)`` with ``2^b - 1`` exponents and a fixed scale of 1, which
  needs no calibration data (SPDFQ Eq. 2, RepQ-ViT).

Two float formats (``fmt``, :data:`dfq_deploy.config.FORMATS`), as TensorRT defines them ("Quantization Schemes",
TensorRT 10.x/11.x developer guide):

* ``fp8``: ``castToFp8(clip(x / s, -448, 448)) * s`` with round-to-nearest-even; ``torch.float8_e4m3fn`` after the
  clamp computes exactly that, and ONNX Runtime 1.32's ``QuantizeLinear`` with a FLOAT8E4M3FN zero point
  (saturate=1) agrees bit for bit in FP32 and FP16 graphs (tests/quant/test_fp_formats.py). Scale = amax / 448.
* ``nvfp4``: E2M1 values ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}`` (round to nearest, ties to even, saturating at 6) in
  blocks of 16 along the last dim; each block's scale ``s_b = fp8(amax_b / 6 / g) * g`` is an FP8 E4M3 value times an
  FP32 global scale ``g = amax / (6 * 448)`` (two-level scaling; Model Optimizer's
  ``NVFP4QTensor`` / ``modelopt.onnx.quantization.quant_utils.get_weights_scaling_factor[_2]``). Weights: block
  scales fixed at calibration; activations: block scales computed from the values at run time (TensorRT's dynamic
  quantization), only the global scale is calibrated.
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


#: Largest finite FP8 E4M3 (FN) value, and of FP4 E2M1.
FP8_MAX = 448.0
FP4_MAX = 6.0
#: Elements per NVFP4 block.
NVFP4_BLOCK = 16


def _ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return x + (q - x).detach() if x.requires_grad else q


def round_fp8(v: torch.Tensor) -> torch.Tensor:
    """``v`` rounded to FP8 E4M3 (nearest, ties to even, saturating at +-448), in ``v``'s dtype."""
    return v.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(v.dtype)


def round_fp4(v: torch.Tensor) -> torch.Tensor:
    """``v`` rounded to FP4 E2M1 (nearest, ties to even, saturating at +-6), in ``v``'s dtype.

    E2M1 steps are 0.5 below 2, 1 in [2, 4) and 2 in [4, 6]: rounding ``v / step`` half-to-even is rounding to the
    nearest code with ties to the even mantissa.
    """
    v = v.clamp(-FP4_MAX, FP4_MAX)
    a = v.abs()
    step = torch.where(a < 2, torch.full_like(a, 0.5), torch.where(a < 4, torch.ones_like(a), torch.full_like(a, 2.0)))
    return torch.round(v / step) * step


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``castToFp8(clip(x / scale, -448, 448)) * scale``; straight-through gradient."""
    return _ste(x, round_fp8(x / scale) * scale)


def nvfp4_block_scales(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Effective per-block scales ``fp8(amax_b / 6 / g) * g`` of ``x`` grouped as ``[..., nblocks, 16]`` (shape
    ``[..., nblocks, 1]``); a block of zeros gets scale 0 (its values stay 0)."""
    amax = x.detach().abs().amax(-1, keepdim=True)
    return round_fp8(amax / FP4_MAX / global_scale) * global_scale


def fake_quant_nvfp4(x: torch.Tensor, global_scale: torch.Tensor, block_scale: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """NVFP4 fake quantization of ``x`` along its last dim in blocks of 16 (dynamic block scales unless given as
    ``[..., nblocks, 1]``)."""
    shape = x.shape
    if shape[-1] % NVFP4_BLOCK:
        raise ValueError(f"nvfp4: the last dim {shape[-1]} is not a multiple of {NVFP4_BLOCK}")
    xb = x.reshape(*shape[:-1], shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK)
    s = nvfp4_block_scales(xb, global_scale) if block_scale is None else block_scale
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.where(s > 0, round_fp4(xb / safe) * s, torch.zeros_like(xb))
    return _ste(x, q.reshape(shape).to(x.dtype))


def fake_quant_fmt(x: torch.Tensor, scale: torch.Tensor, bits: int, fmt: str = "int") -> torch.Tensor:
    """:func:`fake_quant` on the grid of ``fmt`` (``int``, ``fp8``; ``nvfp4``: ``scale`` is the global scale)."""
    if fmt == "fp8":
        return fake_quant_fp8(x, scale)
    if fmt == "nvfp4":
        return fake_quant_nvfp4(x, scale)
    return fake_quant(x, scale, bits)


def grid_max(bits: int, fmt: str = "int") -> float:
    """Largest grid value: ``2^(b-1) - 1`` (int), 448 (fp8), 6 * 448 (nvfp4's global scale: amax / (6 * 448))."""
    return {"fp8": FP8_MAX, "nvfp4": FP4_MAX * FP8_MAX}.get(fmt, float(qrange(bits)[1]))


def quant_int(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The integers ``clamp(round(x / scale))`` that a deployed graph stores."""
    qmin, qmax = qrange(bits)
    return torch.clamp(torch.round(x / scale), qmin, qmax)


def search_scale(x: torch.Tensor, bits: int, method: str, percentile: float = 99.99, fmt: str = "int"
                 ) -> torch.Tensor:
    """Scale(s) for ``x`` grouped along its last dim: x is ``[..., n]`` and one scale per leading index.

    Args:
        x: values, the last dimension holds one group (a channel, a block, or all samples of a tensor).
        bits: grid bits.
        method: ``minmax`` (max |x|), ``percentile`` (that percentile of |x|) or ``mse`` (the clipping
            ratio of max |x| that minimises the squared quantization error, searched per group).
        percentile: used by ``percentile``.
        fmt: the grid, ``int`` or ``fp8`` (``mse`` then measures the error on the FP8 grid); ``nvfp4`` for an
            NVFP4 global scale (``amax / (6 * 448)``).

    Returns:
        Strictly positive scales of shape ``x.shape[:-1]``.
    """
    x = x.detach().float()
    qmax = grid_max(bits, fmt)
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
            err = (fake_quant_fmt(x, scale, bits, fmt) - x).pow(2).mean(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, clip, best)
        amax = best
    elif method != "minmax":
        raise ValueError(f"unknown range method {method}")
    return (amax / qmax).clamp_min(1e-8)


def search_affine(x: torch.Tensor, bits: int, method: str, percentile: float = 99.99) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """Scale and zero point of an asymmetric (affine) ``bits``-bit grid for the 1-D tensor ``x``.

    Args:
        x: values of one tensor.
        bits: grid bits (``2^bits`` levels ``0..2^bits - 1``).
        method: ``minmax`` (``[min, max]``), ``percentile`` (the ``percentile`` and ``100 - percentile``
            percentiles) or ``mse`` (``[min, max]`` shrunk by the ratio that minimises the squared error).
        percentile: used by ``percentile``.

    Returns:
        ``(scale, zero_point)`` as 0-d tensors; the zero point is an integer in ``[0, 2^bits - 1]``, so zero is
        exactly representable.
    """
    x = x.detach().float().reshape(-1)
    levels = (1 << bits) - 1
    lo, hi = x.min().clamp(max=0.0), x.max().clamp(min=0.0)
    if method == "percentile":
        k_hi = max(1, min(x.numel(), math.ceil(x.numel() * percentile / 100.0)))
        k_lo = max(1, min(x.numel(), math.floor(x.numel() * (100.0 - percentile) / 100.0) + 1))
        lo, hi = x.kthvalue(k_lo).values.clamp(max=0.0), x.kthvalue(k_hi).values.clamp(min=0.0)
    elif method == "mse":
        best_err, best = float("inf"), (lo, hi)
        for ratio in torch.linspace(1.0, 0.2, _CLIP_CANDIDATES):
            scale, zp = _affine_params(lo * ratio, hi * ratio, levels)
            err = float((fake_quant_affine(x, scale, zp, bits) - x).pow(2).mean())
            if err < best_err:
                best_err, best = err, (lo * ratio, hi * ratio)
        lo, hi = best
    elif method != "minmax":
        raise ValueError(f"unknown range method {method}")
    return _affine_params(lo, hi, levels)


def _affine_params(lo: torch.Tensor, hi: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale = ((hi - lo) / levels).clamp_min(1e-8)
    return scale, torch.clamp(torch.round(-lo / scale), 0, levels)


def fake_quant_affine(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """``(clamp(round(x / scale) + zero_point, 0, 2^bits - 1) - zero_point) * scale``; straight-through gradient."""
    q = (torch.clamp(torch.round(x / scale) + zero_point, 0, (1 << bits) - 1) - zero_point) * scale
    if x.requires_grad:
        return x + (q - x).detach()
    return q


class WeightQuantizer(nn.Module):
    """Per-output-channel or blockwise weight quantizer for a ``[out, in]`` Linear weight.

    Args:
        bits: grid bits (a 2/3-bit grid is stored in an INT4 container on export).
        block_size: None for per-channel; otherwise the number of input elements per block.
        method: range search method.
        fmt: ``int``, ``fp8`` (per channel, scale = amax / 448, or the MSE clip on the FP8 grid) or ``nvfp4`` (blocks
            of 16; ``scale`` holds the effective block scales ``fp8 block scale x global_scale``, and
            ``global_scale`` the FP32 global scale ``amax / (6 * 448)``).
    """

    def __init__(self, bits: int, block_size: int | None = None, method: str = "mse", fmt: str = "int") -> None:
        super().__init__()
        self.bits = bits
        self.block_size = block_size
        self.method = method
        self.fmt = fmt
        self.enabled = True
        self.register_buffer("scale", torch.empty(0), persistent=True)
        self.register_buffer("global_scale", torch.empty(0), persistent=True)

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
        if self.fmt == "nvfp4":
            if self.block_size != NVFP4_BLOCK:
                raise ValueError(f"nvfp4 weights need blocks of {NVFP4_BLOCK}, got {self.block_size}")
            amax = w.detach().float().abs().max()
            self.global_scale = torch.where(amax > 0, amax / (FP4_MAX * FP8_MAX), torch.ones_like(amax))
            self.scale = nvfp4_block_scales(self._grouped(w), self.global_scale).squeeze(-1)
            return
        self.scale = search_scale(self._grouped(w), self.bits, self.method, fmt=self.fmt)

    def full_scale(self, w: torch.Tensor) -> torch.Tensor:
        """Scales broadcast to ``w``'s shape grouping (``[out, 1]`` or ``[out, nblocks, 1]``)."""
        return self.scale.unsqueeze(-1)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled or not self.calibrated:
            return w
        if self.fmt == "nvfp4":
            return fake_quant_nvfp4(w, self.global_scale, self.full_scale(w))
        if self.fmt == "fp8":
            return fake_quant_fp8(w, self.full_scale(w))
        return fake_quant(self._grouped(w), self.full_scale(w), self.bits).reshape(w.shape)

    def integers(self, w: torch.Tensor) -> torch.Tensor:
        """The values a deployed graph stores, same shape as ``w``: integers, or FP8 / FP4 grid values (as float32;
        an NVFP4 block of scale 0 stores zeros)."""
        s = self.full_scale(w)
        if self.fmt == "fp8":
            return round_fp8(w / s)
        if self.fmt == "nvfp4":
            return torch.where(s > 0, round_fp4(self._grouped(w) / torch.where(s > 0, s, torch.ones_like(s))),
                               torch.zeros_like(self._grouped(w))).reshape(w.shape)
        return quant_int(self._grouped(w), s, self.bits).reshape(w.shape)

    def block_scales_fp8(self) -> torch.Tensor:
        """NVFP4: the FP8 block scales (FP8 E4M3 values as float32, ``[out, nblocks]``), ``scale / global_scale``."""
        return round_fp8(self.scale / self.global_scale)

    def extra_repr(self) -> str:
        gran = "per_channel" if self.block_size is None else f"block={self.block_size}"
        return f"bits={self.bits}, {gran}, method={self.method}" + ("" if self.fmt == "int" else f", {self.fmt}")


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer with an observing phase.

    In ``observing`` mode the input passes through unchanged while its running max and a random reservoir of
    values are recorded; :meth:`finalize` then picks the scale (and, on the asymmetric grid, the zero point).

    Args:
        bits: grid bits.
        method: ``minmax``, ``percentile`` or ``mse``.
        percentile: for ``percentile``.
        log2: use a log2 grid for non-negative inputs (softmax outputs; simulation only, not deployable).
        asymmetric: use an affine grid with a zero point (simulation only, not deployable).
        fmt: ``int``, ``fp8`` (per-tensor FP8 E4M3, scale from ``method`` on the FP8 grid) or ``nvfp4`` (``scale`` is
            the global scale ``amax / (6 * 448)``; block scales are computed from the values at run time).
    """

    def __init__(self, bits: int, method: str = "percentile", percentile: float = 99.99, log2: bool = False,
                 asymmetric: bool = False, fmt: str = "int") -> None:
        super().__init__()
        self.bits = bits
        self.fmt = fmt
        self.method = method
        self.percentile = percentile
        self.log2 = log2
        self.asymmetric = asymmetric and not log2
        self.enabled = True
        self.observing = False
        #: A range ``(lo, hi)`` known without data (the model input's, from its normalisation): the scale is
        #: chosen from it instead of from what was observed.
        self.fixed_range: tuple[float, float] | None = None
        self.register_buffer("scale", torch.empty(0), persistent=True)
        self.register_buffer("zero_point", torch.empty(0), persistent=True)
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
        method = self.method
        if self.fixed_range is not None:  # minmax on the two ends of the known range
            values, method = torch.tensor(self.fixed_range, device=values.device), "minmax"
        if method == "mse" and values.numel() > _MSE_SAMPLES:  # the MSE search needs far fewer values
            extremes = torch.stack([values.min(), values.max()])
            values = torch.cat([values[torch.randperm(values.numel(), generator=self._observer_gen())[:_MSE_SAMPLES]],
                                extremes])
        if self.log2:
            self.scale = torch.ones((), device=values.device)
        elif self.asymmetric:
            self.scale, self.zero_point = search_affine(values, self.bits, method, self.percentile)
        else:
            scale = search_scale(values.unsqueeze(0), self.bits, method, self.percentile, fmt=self.fmt)[0]
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
        if self.asymmetric:
            return fake_quant_affine(x, self.scale, self.zero_point, self.bits)
        return fake_quant_fmt(x, self.scale, self.bits, self.fmt)

    def extra_repr(self) -> str:
        grid = ", log2" if self.log2 else ", asymmetric" if self.asymmetric else ""
        grid += "" if self.fmt == "int" else f", {self.fmt}"
        return f"bits={self.bits}, method={self.method}{grid}"

