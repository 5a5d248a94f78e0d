"""Closed-form corrections: they reduce the per-block error on held-back inputs, and they validate their input."""

from __future__ import annotations

import copy

import pytest
import torch

from dfq_deploy.config import PRESETS
from dfq_deploy.quant.correct import block_errors, fit_corrections_, plot_block_errors
from dfq_deploy.quant.correct.fold import pending_corrections
from dfq_deploy.quant.qmodel import batches_loop, quantize, transformer_blocks


def structured(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give a random-weight model trained-ViT-like LayerNorms: spread gains, a few outlier channels, offsets."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in transformer_blocks(model):
            for norm in (block.norm1, block.norm2):
                norm.weight.copy_(torch.exp(0.5 * torch.randn(norm.weight.shape, generator=g)))
                norm.weight[:4] *= 8
                norm.bias.copy_(0.5 * torch.randn(norm.bias.shape, generator=g))
    return model


def _setup(model, preset):
    g = torch.Generator().manual_seed(1)
    calib, held = torch.randn(32, 3, 32, 32, generator=g), torch.randn(16, 3, 32, 32, generator=g)
    structured(model)
    fp = copy.deepcopy(model)
    quantize(model, PRESETS[preset], batches_loop(calib))
    return fp, calib, held


def _mean_nmse(errs):
    return sum(b["nmse"] for b in errs["blocks"]) / len(errs["blocks"])


@pytest.mark.parametrize("mode, preset, factor", [("bias", "W4A16", 0.9), ("diag", "W4A16", 0.85),
                                                   ("full", "W4A16", 0.6), ("full", "W8A8", 0.85)])
def test_correction_reduces_held_back_block_error(tiny_model, mode, preset, factor):
    fp, calib, held = _setup(tiny_model, preset)
    before = block_errors(tiny_model, fp, held)
    report = fit_corrections_(tiny_model, fp, calib, mode, fold=True)
    after = block_errors(tiny_model, fp, held)
    assert pending_corrections(tiny_model) == []
    assert _mean_nmse(after) < factor * _mean_nmse(before), (before, after)
    assert all(a["cos"] > b["cos"] for a, b in zip(after["blocks"], before["blocks"], strict=True))
    assert len(report["layers"]) == 8 and report["fit_s"] > 0
    if preset == "W4A16":  # the class token, and the logits read from it, improve too
        assert all(a["cls_nmse"] < b["cls_nmse"] for a, b in zip(after["blocks"], before["blocks"], strict=True))
        assert after["logits"]["nmse"] < (0.3 if mode == "full" else 0.7) * before["logits"]["nmse"]
    if mode == "full":
        assert any(v["alpha"] is not None for v in report["layers"].values())  # a matrix was chosen somewhere
    if mode in ("bias", "diag"):  # least squares that contains the identity cannot be worse on its own data
        assert all(v["out_mse_after"] <= v["out_mse_before"] * (1 + 1e-6) for v in report["layers"].values())


def test_none_mode_changes_nothing_and_bad_input_is_refused(tiny_model):
    fp, calib, held = _setup(tiny_model, "W8A8")
    state = copy.deepcopy(tiny_model.state_dict())
    assert fit_corrections_(tiny_model, fp, calib, "none")["layers"] == {}
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="unknown correction mode"):
        fit_corrections_(tiny_model, fp, calib, "matrix")
    with pytest.raises(ValueError, match="share parameters"):
        fit_corrections_(tiny_model, tiny_model, calib, "bias")


def test_block_errors_of_a_model_with_itself(tiny_model):
    x = torch.randn(8, 3, 32, 32)
    errs = block_errors(tiny_model, copy.deepcopy(tiny_model), x)
    assert len(errs["blocks"]) == 2
    for b in errs["blocks"]:
        assert b["mse"] == 0 and b["cls_mse"] == 0 and b["cos"] == pytest.approx(1.0, abs=1e-5)
    assert errs["logits"]["top1_agreement"] == 1.0


def test_plot_is_a_png():
    pytest.importorskip("matplotlib")
    stage = {"blocks": [{"mse": 1e-3, "nmse": 1e-2, "cos": 0.99}, {"mse": 2e-3, "nmse": 2e-2, "cos": 0.98}],
             "logits": {"nmse": 0.1}}
    png = plot_block_errors({"mode": "diag", "stages": {"quantized": stage, "corrected": stage}})
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"


def _layer_data(n_images: int, tokens: int, d: int, seed: int = 0):
    from dfq_deploy.quant.correct.fit import _LayerData

    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n_images * tokens, d, generator=g)
    image = torch.arange(n_images).repeat_interleave(tokens)
    prefix = torch.zeros(len(a), dtype=torch.bool)
    return _LayerData(a, a.clone(), image, prefix), g


def test_shrinkage_keeps_a_real_correction_and_drops_one_that_fits_noise():
    from dfq_deploy.quant.correct.fit import _fit_output_shrunk

    data, g = _layer_data(16, 8, 6)
    y = torch.randn(len(data.a), 6, generator=g)
    yq = (y - 0.3) / 1.2 + 0.01 * torch.randn(y.shape, generator=g)  # a consistent gain and offset error
    s, t, beta = _fit_output_shrunk(yq, y, data, affine=True, val_every=4)
    assert beta == 1.0 and torch.allclose(s, torch.full((6,), 1.2), atol=0.02)
    yq2 = y.clone()  # no error, except that every image has its own random offset: nothing generalises
    yq2 += torch.randn(16, 6, generator=g).repeat_interleave(8, dim=0)
    s2, t2, beta2 = _fit_output_shrunk(yq2, y, data, affine=False, val_every=4)
    assert s2 is None and beta2 < 1.0
    from dfq_deploy.quant.correct.fit import _fit_output

    _, t_full = _fit_output(yq2, y, data.weight, affine=False)
    assert torch.allclose(t2, beta2 * t_full)


def test_shrink_is_reported_per_layer(tiny_model):
    fp, calib, held = _setup(tiny_model, "W4A4")
    report = fit_corrections_(tiny_model, fp, calib, "diag", shrink=True, fold=True)
    betas = [v["shrink_beta"] for v in report["layers"].values()]
    assert len(betas) == 8 and all(b in (0.0, 0.25, 0.5, 0.75, 1.0) for b in betas)


def test_full_chooses_its_strength_after_requantization():
    """The held-out error of a candidate input map counts the rounding of the re-quantized ``W M``."""
    from dfq_deploy.quant.correct.fit import _output_err, _requantizer
    from dfq_deploy.quant.qmodel import QuantLinear

    cfg = PRESETS["W2A16"].with_(w_granularity="per_channel")
    lin = QuantLinear.from_linear(torch.nn.Linear(16, 8), cfg)
    lin.weight_quantizer.calibrate(lin.weight.detach())
    data, g = _layer_data(8, 16, 16)
    m = torch.eye(16, dtype=torch.float64) + 0.05 * torch.randn(16, 16, generator=g, dtype=torch.float64)
    c = torch.zeros(16, dtype=torch.float64)
    w = lin.weight.detach()
    float_err = _output_err(data.a, data.x, data.weight, m, c, w)
    requant = _requantizer(lin)
    after_err = _output_err(data.a, data.x, data.weight, m, c, w, requant)
    assert after_err > float_err  # the float error cannot see the 2-bit rounding of W M
    wm = (w.double() @ m).float()
    assert torch.equal(requant(wm), requant(wm)) and not torch.equal(requant(wm), wm)
