"""Closed-form activation correction of a fake-quant ViT, block by block, without backpropagation.

For every quantized Linear, in forward order (block by block, and layer by layer inside a block, so that each
layer sees the already quantized *and corrected* layers before it), the calibration images are run through the
quantized model and the full-precision twin, and the layer's inputs are paired token by token:

* ``a``: the dequantized input the quantized layer actually multiplies, ``Q_a(x_hat)`` (``x_hat`` carries every
  upstream error, activation quantization included), and
* ``x``: the full-precision model's input of the same layer; its target output is ``y = W_fp x + b_fp``.

Corrections (see :mod:`dfq_deploy.quant.correct.fold` for why these placements fold exactly):

``bias``
    Bias correction: ``t = E[y] - E[y_hat]`` with ``y_hat = Q_w(W) a + b``, folded into the bias. The expected
    output error of the layer (weight rounding, activation clipping, upstream drift) is removed.
``diag``
    Per-output-channel affine ``y_hat -> s * y_hat + t`` by least squares per channel
    (``s = cov(y_hat, y) / var(y_hat)``, clamped to [0.5, 2], ``t`` as above). Folded exactly into the weight
    rows, the per-channel weight scales (same integers) and the bias.
``full``
    Input-side affine map ``a -> M a + c`` fitted by ridge least squares of ``x`` on ``a``, shrunk towards the
    identity: ``M^T = (C_aa + lambda I)^-1 (C_ax + lambda I)`` with centred covariances and
    ``c = E[x] - M E[a]``. ``lambda = alpha * trace(C_aa) / d``; ``alpha`` is chosen per layer on held-out
    calibration images (a quarter of them) by the output error after re-quantization,
    ``||Q_w(W M) a + W c - W x||^2`` (the weight scales re-chosen for each candidate ``W M``, as the fold does),
    and the identity (no matrix) is always a candidate. The map acts on the dequantized input, after the ``Q/DQ`` pair,
    so it folds into the weight, ``W <- W M`` and ``b <- b + W c``, *before* the weights are re-quantized
    (the weight scales are re-chosen for ``W M``). A bias correction then removes the mean error left by
    re-quantizing ``W M``.

Without constraints the least-squares ``M`` is the same whichever output weighting is used (each output
channel is a linear function of ``x``), so fitting the input map also gives the best linear reconstruction of
the layer's output in the span of ``W``; the ridge term keeps it from fitting the quantization noise of a few
thousand tokens.

Shrinkage (``shrink=True``): an output correction fitted fully on a few dozen images also fits their
peculiarities. Each layer's output affine ``y -> s y + t`` is then moved towards the identity,
``y -> y + beta (s y + t - y)``, with ``beta`` in :data:`SHRINK_BETAS` chosen on the held-out quarter of the
calibration images (fitted on the other three quarters), and applied to the fit on all of them.

Token weighting: one affine map per layer serves every token, and the class token (what the head reads) is
one token among ``T`` with its own statistics; a plain token average fits the patch tokens and can move the
class token the wrong way (measured: bias correction alone made the logits of the CIFAR-10 DeiT worse). The
prefix tokens are therefore given a fixed share of the fitting weight (:data:`PREFIX_SHARE`).

What stays exact: corrections never change an activation quantizer's input, so every activation scale
calibrated on the float model remains valid, and the folded model exports to the same QDQ graph.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfq_deploy.config import CORRECTION_MODES
from dfq_deploy.progress import Progress
from dfq_deploy.quant.correct.capture import (
    block_inputs,
    check_separate,
    eval_mode,
    named_block_linears,
    num_prefix_tokens,
    run_capture,
)
from dfq_deploy.quant.correct.fold import LinearCorrection, attach_correction_, fold_corrections_, fold_linear_
from dfq_deploy.quant.qmodel import QuantLinear, quant_disabled, transformer_blocks

logger = logging.getLogger(__name__)

MODES = CORRECTION_MODES  # the choices live in dfq_deploy.config
#: Ridge strengths (times ``trace(C_aa) / d``) tried per layer by ``full``; the identity is always tried too.
DEFAULT_ALPHAS: tuple[float, ...] = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
#: Tokens kept per layer for fitting (a random subset beyond this).
MAX_TOKENS = 1 << 15
#: Share of the fitting weight of the class token(s): about 9 patch tokens' worth at 64 patches.
PREFIX_SHARE = 0.125
_SCALE_CLAMP = (0.5, 2.0)
#: Strengths of the output correction tried by ``shrink`` (0: no correction, 1: the full least-squares fit).
SHRINK_BETAS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


# --- per-layer data ----------------------------------------------------------------------------------------
class _LayerData:
    """Paired tokens of one layer: dequantized inputs of the quantized model and inputs of the float model.

    Attributes:
        a: ``[n, d]`` dequantized inputs of the quantized layer.
        x: ``[n, d]`` inputs of the float layer.
        image: ``[n]`` index of the image each token comes from.
        prefix: ``[n]`` True for prefix (class / distillation) tokens.
        weight: ``[n]`` fitting weight of each token.
    """

    def __init__(self, a: torch.Tensor, x: torch.Tensor, image: torch.Tensor, prefix: torch.Tensor) -> None:
        self.a, self.x, self.image, self.prefix = a, x, image, prefix
        self.weight = torch.ones(len(a), dtype=torch.float64, device=a.device)

    def reweight_(self, prefix_share: float | None) -> _LayerData:
        """Give the prefix (class) tokens together ``prefix_share`` of the fitting weight (None: uniform)."""
        n_pre = int(self.prefix.sum())
        if prefix_share is None or n_pre == 0 or n_pre == len(self.prefix):
            self.weight = torch.ones(len(self.a), dtype=torch.float64, device=self.a.device)
        else:
            share = min(max(prefix_share, 0.0), 1.0)
            self.weight = torch.where(self.prefix, share / n_pre, (1 - share) / (len(self.prefix) - n_pre)).double()
        return self

    def split(self, val_every: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Masks of (fit, validation) tokens, validation = every ``val_every``-th image; None if too few images."""
        if len(self.image) == 0 or int(self.image.max()) + 1 < val_every:
            return None
        val = (self.image % val_every) == val_every - 1
        return ~val, val


@torch.no_grad()
def _collect_layer(
    qblock: nn.Module, fblock: nn.Module, lin: QuantLinear, flin: nn.Module, xq: torch.Tensor, xf: torch.Tensor,
    batch_size: int, max_tokens: int, n_prefix: int, gen: torch.Generator,
) -> _LayerData:
    parts: list[tuple[torch.Tensor, ...]] = []
    rate: float | None = None
    for start in range(0, len(xq), batch_size):
        a = run_capture(qblock, xq[start : start + batch_size], lin)
        if lin.input_quantizer is not None:
            a = lin.input_quantizer(a)
        with quant_disabled(fblock):
            x = run_capture(fblock, xf[start : start + batch_size], flin)
        n_b = min(batch_size, len(xq) - start)
        a, x = a.reshape(n_b, -1, a.shape[-1]), x.reshape(n_b, -1, x.shape[-1])
        seq = a.shape[1]
        ids = torch.arange(start, start + n_b, device=a.device)[:, None].expand(n_b, seq).reshape(-1)
        prefix = (torch.arange(seq, device=a.device) < n_prefix)[None].expand(n_b, seq).reshape(-1)
        a, x = a.reshape(-1, a.shape[-1]), x.reshape(-1, x.shape[-1])
        if rate is None:
            rate = min(1.0, max_tokens / (seq * len(xq)))
        if rate < 1.0:
            keep = (torch.rand(a.shape[0], generator=gen).to(a.device) < rate) | prefix  # drawn on the CPU
            a, x, ids, prefix = a[keep], x[keep], ids[keep], prefix[keep]
        parts.append((a.float(), x.float(), ids, prefix))
    a, x, ids, prefix = (torch.cat(t) for t in zip(*parts, strict=True))
    return _LayerData(a, x, ids, prefix)


# --- closed-form fits --------------------------------------------------------------------------------------
def _wmean(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted mean over the first dim (``w`` sums to anything positive)."""
    return (w / w.sum()) @ v


def _moments(a: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Weighted means and centred (co)variances ``(E a, E x, C_aa, C_ax)`` in float64."""
    a, x, w = a.double(), x.double(), w.double() / w.sum()
    ma, mx = w @ a, w @ x
    ac = a - ma
    acw = ac * w[:, None]
    return ma, mx, acw.T @ ac, acw.T @ (x - mx)


def _ridge(moments: tuple[torch.Tensor, ...], alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, c)`` of the ridge fit ``x ~ M a + c`` shrunk towards ``M = I``; ``alpha = inf`` gives ``I``."""
    ma, mx, caa, cax = moments
    d = caa.shape[0]
    eye = torch.eye(d, dtype=caa.dtype, device=caa.device)
    if math.isinf(alpha):
        m = eye
    else:
        lam = alpha * float(torch.trace(caa)) / d + 1e-12
        m = torch.linalg.solve(caa + lam * eye, cax + lam * eye).T
    return m, mx - m @ ma


def _output_err(
    a: torch.Tensor, x: torch.Tensor, w_tok: torch.Tensor, m: torch.Tensor, c: torch.Tensor, weight: torch.Tensor,
    requant: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Weighted mean squared error of ``Q_w(W M) a + W c`` against ``W x`` (``Q_w`` the identity without
    ``requant``)."""
    wd = weight.double()
    wm = wd @ m
    if requant is not None:
        wm = requant(wm.float()).double()
    pred = a.double() @ wm.T + wd @ c
    return float(_wmean((pred - x.double() @ wd.T).pow(2).mean(1), w_tok.double()))


def _requantizer(lin: QuantLinear) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the fold does to a weight: a copy of ``lin``'s weight quantizer re-calibrated on it, applied."""
    if lin.weight_quantizer is None:
        return None

    def requant(w: torch.Tensor) -> torch.Tensor:
        wq = copy.deepcopy(lin.weight_quantizer)
        wq.enabled = True
        wq.calibrate(w)
        return wq(w)

    return requant


def _fit_input_map(
    data: _LayerData, weight: torch.Tensor, alphas: Sequence[float], default_alpha: float, val_every: int,
    requant: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Ridge input map with ``alpha`` chosen on held-out images by the error after re-quantizing ``W M`` (or
    ``default_alpha`` with too few images)."""
    info: dict[str, Any] = {}
    masks = data.split(val_every)
    alpha = default_alpha
    if masks is not None:
        fit, val = masks
        mom = _moments(data.a[fit], data.x[fit], data.weight[fit])
        av, xv, wv = data.a[val], data.x[val], data.weight[val]
        d = weight.shape[1]
        eye = torch.eye(d, dtype=torch.float64, device=av.device)
        none_err = _output_err(av, xv, wv, eye, torch.zeros(d, dtype=torch.float64, device=av.device), weight,
                               requant)
        errs = {a_: _output_err(av, xv, wv, *_ridge(mom, a_), weight, requant) for a_ in (*alphas, math.inf)}
        alpha = min(errs, key=lambda k: errs[k])
        info["val_err_uncorrected"] = none_err
        info["val_err"] = errs[alpha]
    info["alpha"] = None if math.isinf(alpha) else alpha
    m, c = _ridge(_moments(data.a, data.x, data.weight), alpha)
    return m.float(), c.float(), info


def _fit_output(
    yq: torch.Tensor, y: torch.Tensor, w: torch.Tensor, affine: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per-output-channel ``(s, t)`` so that ``s * yq + t`` fits ``y`` in weighted least squares (``s`` None for
    bias only)."""
    yq, y, w = yq.double(), y.double(), w.double()
    mq, my = _wmean(yq, w), _wmean(y, w)
    if not affine:
        return None, (my - mq).float()
    var = _wmean((yq - mq).pow(2), w)
    cov = _wmean((yq - mq) * (y - my), w)
    s = torch.where(var > 1e-20, cov / var.clamp_min(1e-20), torch.ones_like(var)).clamp(*_SCALE_CLAMP)
    return s.float(), (my - s * mq).float()


def _shrunk(s: torch.Tensor | None, t: torch.Tensor, beta: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``y -> y + beta (s y + t - y)``: the correction moved towards the identity."""
    return (None if s is None else 1 + beta * (s - 1)), beta * t


def _fit_output_shrunk(
    yq: torch.Tensor, y: torch.Tensor, data: _LayerData, affine: bool, val_every: int,
) -> tuple[torch.Tensor | None, torch.Tensor, float | None]:
    """:func:`_fit_output` on every token, shrunk by the ``beta`` of :data:`SHRINK_BETAS` that does best on
    held-out images when fitted on the others (``beta`` None, no shrinkage, with too few images)."""
    s, t = _fit_output(yq, y, data.weight, affine)
    masks = data.split(val_every)
    if masks is None:
        return s, t, None
    fit, val = masks
    s_f, t_f = _fit_output(yq[fit], y[fit], data.weight[fit], affine)
    yv, tv, wv = yq[val], y[val], data.weight[val]

    def err(beta: float) -> float:
        sb, tb = _shrunk(s_f, t_f, beta)
        pred = yv * (1.0 if sb is None else sb) + tb
        return float(_wmean((pred - tv).double().pow(2).mean(1), wv))

    beta = min(SHRINK_BETAS, key=err)
    return (*_shrunk(s, t, beta), beta)


@torch.no_grad()
def _quantized_output(lin: QuantLinear, a: torch.Tensor) -> torch.Tensor:
    """What ``lin`` (with its pending correction) outputs for dequantized input ``a``."""
    corr = getattr(lin, "correction", None)
    w, b = (lin.weight, lin.bias) if corr is None else corr.input_folded(lin.weight, lin.bias)
    if lin.weight_quantizer is not None:
        w = lin.weight_quantizer(w.detach())
    y = F.linear(a, w, b)
    return y if corr is None else corr.apply_output(y)


def _out_mse(lin: QuantLinear, data: _LayerData, y: torch.Tensor) -> float:
    return float(_wmean((_quantized_output(lin, data.a) - y).double().pow(2).mean(1), data.weight))


@torch.no_grad()
def _fit_layer(
    lin: QuantLinear, flin: nn.Module, data: _LayerData, mode: str, alphas: Sequence[float], default_alpha: float,
    val_every: int, shrink: bool = False,
) -> dict[str, Any]:
    info: dict[str, Any] = {"tokens": int(data.a.shape[0])}
    y = F.linear(data.x, flin.weight.float(), None if flin.bias is None else flin.bias.float())
    info["out_mse_before"] = _out_mse(lin, data, y)
    if lin.bias is None:
        logger.warning("a Linear without bias cannot take a folded correction: left as is")
        info["skipped"] = "no bias"
        return info
    if mode == "full":
        m, c, fit_info = _fit_input_map(data, lin.weight.detach(), alphas, default_alpha, val_every,
                                        _requantizer(lin))
        info.update(fit_info)
        attach_correction_(lin, LinearCorrection(in_matrix=m, in_bias=c))
        fold_linear_(lin)  # the re-quantized W M is final: the output part is fitted on it
    yq = _quantized_output(lin, data.a)
    if shrink:
        s, t, info["shrink_beta"] = _fit_output_shrunk(yq, y, data, mode == "diag", val_every)
    else:
        s, t = _fit_output(yq, y, data.weight, affine=mode == "diag")
    attach_correction_(lin, LinearCorrection(out_scale=s, out_bias=t))
    info["out_mse_after"] = _out_mse(lin, data, y)
    return info


# --- the model-level API -----------------------------------------------------------------------------------
def fit_corrections_(
    model: nn.Module,
    fp_model: nn.Module,
    images: torch.Tensor,
    mode: str = "bias",
    *,
    batch_size: int = 32,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    default_alpha: float = 0.1,
    val_every: int = 4,
    max_tokens: int = MAX_TOKENS,
    prefix_share: float | None = PREFIX_SHARE,
    shrink: bool = False,
    fold: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit closed-form corrections of every quantized Linear inside the transformer blocks, in forward order.

    Each layer's correction is attached (pending) as soon as it is fitted, so later layers and blocks are fitted
    on the corrected model. With ``mode="full"`` the input map is folded into the weights right away (its
    weights have to be re-quantized before the output-side bias correction is fitted); the output-side part
    stays pending until :func:`~dfq_deploy.quant.correct.fold.fold_corrections_` (or ``fold=True``).

    Args:
        model: the fake-quant model (after :func:`~dfq_deploy.quant.qmodel.quantize`); changed in place.
        fp_model: its full-precision twin (a deep copy taken before ``quantize``; same module names).
        images: calibration images ``[N, C, H, W]`` in model space.
        mode: ``none``, ``bias``, ``diag`` or ``full`` (see the module docstring).
        batch_size: images per forward pass.
        alphas: ridge strengths tried by ``full``.
        default_alpha: ridge strength when there are fewer than ``val_every`` images to choose one.
        val_every: every ``val_every``-th calibration image is held out to choose ``alpha``.
        max_tokens: tokens kept per layer (random subset beyond; prefix tokens are always kept).
        prefix_share: share of the fitting weight given to the prefix (class) tokens together; the head reads
            only the class token, which one affine map per layer otherwise fits as one token among ``T``.
            None weighs every token alike.
        shrink: move each output correction towards the identity by the strength chosen on held-out images
            (see the module docstring).
        fold: fold every correction before returning.
        seed: seed of the token subsampling.

    Returns:
        ``{"mode", "layers": {name: figures}, "fit_s"}``; per layer the token count, the output MSE on the
        calibration tokens before/after, and for ``full`` the chosen ``alpha`` and held-out errors.

    Raises:
        ValueError: unknown mode, shared parameters, or no transformer blocks.
    """
    if mode not in MODES:
        raise ValueError(f"unknown correction mode '{mode}': use one of {', '.join(MODES)}")
    t0 = time.perf_counter()
    report: dict[str, Any] = {"mode": mode, "layers": {}}
    if mode == "none":
        report["fit_s"] = 0.0
        return report
    check_separate(model, fp_model)
    qblocks, fblocks = transformer_blocks(model), transformer_blocks(fp_model)
    if not qblocks or len(qblocks) != len(fblocks):
        raise ValueError(f"found {len(qblocks)} / {len(fblocks)} transformer blocks in model / fp_model")
    in_blocks = {id(m) for b in qblocks for m in b.modules()}
    outside = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and id(m) not in in_blocks]
    if outside:
        logger.info("not corrected (outside transformer blocks): %s", ", ".join(outside))
    gen = torch.Generator().manual_seed(seed)
    fmods = dict(fp_model.named_modules())
    n_prefix = num_prefix_tokens(model)
    with eval_mode(model, fp_model), Progress(len(qblocks), f"correct ({mode})", "blocks", logger, every_s=0) as prog:
        for qb, fb in zip(qblocks, fblocks, strict=True):
            xq = block_inputs(model, qb, images, batch_size)
            with quant_disabled(fp_model):
                xf = block_inputs(fp_model, fb, images, batch_size)
            for name, lin in named_block_linears(model, qb):
                data = _collect_layer(qb, fb, lin, fmods[name], xq, xf, batch_size, max_tokens, n_prefix, gen)
                data.reweight_(prefix_share)
                info = _fit_layer(lin, fmods[name], data, mode, alphas, default_alpha, val_every, shrink)
                report["layers"][name] = info
                logger.debug("%s: %s", name, info)
            prog.update()
    if fold:
        fold_corrections_(model)
    report["fit_s"] = time.perf_counter() - t0
    return report
