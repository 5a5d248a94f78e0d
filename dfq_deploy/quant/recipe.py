"""The recipe ``export`` ships, in one call: :func:`quantize_`.

[reparameterise] -> quantize (ranges from the calibration set) -> [reconstruct] -> correct -> fold, with the
algorithm in the configs (:class:`~dfq_deploy.config.QuantConfig`, :class:`~dfq_deploy.config.CorrectionConfig`),
as torchao's ``quantize_(model, config)`` and Model Optimizer's ``mtq.quantize(model, config, forward_loop)``.
The export job and the accuracy benchmark both call it, so the benchmark measures what ships.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch

from dfq_deploy.config import CorrectionConfig, QuantConfig
from dfq_deploy.device import exact_float32
from dfq_deploy.quant.correct import block_errors, fit_corrections_
from dfq_deploy.quant.correct.fold import fold_corrections_
from dfq_deploy.quant.correct.reconstruct import reconstruct_
from dfq_deploy.quant.correct.reparam import reparam_layernorm_
from dfq_deploy.quant.qmodel import batches_loop, quantize

logger = logging.getLogger(__name__)

#: Seed offset of the Gaussian inputs :func:`quantize_` reports its errors on when no ``held`` set is given
#: (the export job's held-back parity inputs use the same offset).
HELD_SEED_OFFSET = 1_000_003


def held_back_noise(calib: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Gaussian images shaped like ``calib``, drawn from ``seed + HELD_SEED_OFFSET`` (error reports, parity)."""
    gen = torch.Generator().manual_seed(seed + HELD_SEED_OFFSET)
    return torch.randn(calib.shape, generator=gen)


def quantize_(
    model: torch.nn.Module, config: QuantConfig, calib: torch.Tensor, correction: CorrectionConfig | None = None,
    *, held: torch.Tensor | None = None, seed: int = 0, timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Quantize ``model`` in place with the export's recipe: [reparameterise], ranges, [reconstruct], correct.

    Example::

        from dfq_deploy import W8A8, CorrectionConfig, quantize_
        report = quantize_(model, W8A8, calib_images)                       # diag correction, folded
        report = quantize_(model, W8A8, calib_images, CorrectionConfig(mode="full", reconstruct=True))

    Args:
        model: a timm ViT/DeiT/Swin (changed in place; runs on its device).
        config: the quantization (a preset such as ``W8A8`` or a :class:`~dfq_deploy.config.QuantConfig`).
        calib: calibration images ``[N, C, H, W]`` in model space (CPU tensors are fine).
        correction: what is fitted after the ranges (default :class:`~dfq_deploy.config.CorrectionConfig`:
            ``diag``, folded into the weights).
        held: inputs the per-block errors are reported on (default: Gaussian images, :func:`held_back_noise`).
        seed: seed of the token subsampling and reconstruction.
        timings: a dict to add stage timings to.

    Returns:
        The report's ``correction`` section: settings, per-block errors against the float model on the held-back
        inputs after each stage (``stages``), a before/after table (``blocks``), per-layer fits and timings.
    """
    with exact_float32():  # every fit, reconstruction and error report in float32, TF32 off
        return _recipe(model, config, calib, correction, held, seed, timings)


def _recipe(model: torch.nn.Module, config: QuantConfig, calib: torch.Tensor, correction: CorrectionConfig | None,
            held: torch.Tensor | None, seed: int, timings: dict[str, float] | None) -> dict[str, Any]:
    correction = CorrectionConfig() if correction is None else correction
    correct, reparam = correction.mode, correction.reparam
    reconstruct, reconstruct_iters = correction.reconstruct, correction.reconstruct_iters
    cfg = config
    held = held_back_noise(calib, seed) if held is None else held
    timings = {} if timings is None else timings
    if cfg.is_float:
        t = time.perf_counter()
        quantize(model, cfg, batches_loop(calib))
        timings["quantize_s"] = time.perf_counter() - t
        return {"mode": "none", "skipped": "float export"}
    rep: dict[str, Any] = {"mode": correct, "shrink": correction.shrink, "reparam": False, "reconstruct": reconstruct,
                           "evaluated_on": f"held_back ({len(held)} inputs)", "stages": {}}
    stage_s: dict[str, float] = {}
    t = time.perf_counter()
    if reparam and cfg.quantizes_activations:
        layers = reparam_layernorm_(model, calib)["layers"]
        rep["reparam"] = True
        rep["reparam_range_ratio"] = {
            "before": max((v["range_ratio_before"] for v in layers.values()), default=None),
            "after": max((v["range_ratio_after"] for v in layers.values()), default=None),
        }
        stage_s["reparam_s"] = time.perf_counter() - t
    elif reparam:
        logger.info("reparam: %s has float activations, nothing to reparameterise", cfg.name)
    fp_model = copy.deepcopy(model)
    t = time.perf_counter()
    logger.info("ranges: %s from %d calibration images ...", cfg.name, len(calib))
    quantize(model, cfg, batches_loop(calib))
    timings["quantize_s"] = time.perf_counter() - t
    stage_s["quantize_s"] = timings["quantize_s"]
    logger.info("ranges: done in %.1f s", timings["quantize_s"])

    def measure(stage: str) -> None:
        t = time.perf_counter()
        logger.info("errors of the %s model against the float model on %d held-back inputs ...", stage, len(held))
        rep["stages"][stage] = block_errors(model, fp_model, held)
        stage_s[f"errors_{stage}_s"] = time.perf_counter() - t

    measure("quantized")
    if reconstruct:
        t = time.perf_counter()
        rec = reconstruct_(model, fp_model, calib, iters=reconstruct_iters, seed=seed)
        stage_s["reconstruct_s"] = time.perf_counter() - t
        rep["reconstruction"] = rec
        measure("reconstructed")
    if correct != "none":
        t = time.perf_counter()
        fit = fit_corrections_(model, fp_model, calib, correct, shrink=correction.shrink, seed=seed)
        stage_s["fit_s"] = time.perf_counter() - t
        t = time.perf_counter()
        fold_corrections_(model)
        stage_s["fold_s"] = time.perf_counter() - t
        rep["layers"] = fit["layers"]
        measure("corrected")
    first, last = rep["stages"]["quantized"], list(rep["stages"].values())[-1]
    rep["blocks"] = [
        {"block": i, **{f"{k}_before": b[k] for k in ("mse", "nmse", "cos")},
         **{f"{k}_after": a[k] for k in ("mse", "nmse", "cos")}}
        for i, (b, a) in enumerate(zip(first["blocks"], last["blocks"], strict=True))
    ]
    rep["logits"] = {"before": first["logits"], "after": last["logits"]}
    rep["timings"] = stage_s
    timings["correction_s"] = sum(v for k, v in stage_s.items() if k != "quantize_s")
    logger.info("correction %s: held-back logits nmse %.3g -> %.3g", correct, first["logits"]["nmse"],
                last["logits"]["nmse"])
    return rep
