"""LayerNorm -> Linear scale reparameterisation: same float function, smaller per-tensor INT8 error."""

from __future__ import annotations

import copy

import pytest
import torch

from dfq_deploy.config import PRESETS
from dfq_deploy.quant.correct import block_errors
from dfq_deploy.quant.correct.reparam import layernorm_linear_pairs, reparam_layernorm_
from dfq_deploy.quant.qmodel import batches_loop, quantize
from tests.quant.test_correction import structured


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 3, 32, 32, generator=g), torch.randn(16, 3, 32, 32, generator=g)


@pytest.mark.parametrize("alpha, shift", [(0.5, True), (1.0, False)])
def test_float_function_is_unchanged(tiny_model, alpha, shift):
    structured(tiny_model)
    calib, held = _data()
    ref = copy.deepcopy(tiny_model)
    report = reparam_layernorm_(tiny_model, calib, alpha=alpha, shift=shift)
    assert len(layernorm_linear_pairs(tiny_model)) == 4 and len(report["layers"]) == 4
    norm = tiny_model.blocks[0].norm1
    assert not torch.allclose(norm.weight, ref.blocks[0].norm1.weight)  # the parameters did move
    seen = {}
    hooks = [m.blocks[0].norm2.register_forward_hook(lambda _m, _a, y, k=k: seen.__setitem__(k, y))
             for k, m in (("new", tiny_model), ("old", ref))]
    with torch.no_grad():
        out, expected = tiny_model(held), ref(held)
    for h in hooks:
        h.remove()
    assert torch.allclose(out, expected, atol=1e-5 * float(expected.abs().max()) + 1e-6, rtol=1e-4)

    def spread(y):  # widest channel's max |y| over the median channel's
        amax = y.abs().flatten(0, 1).amax(0)
        return float(amax.max() / amax.median())

    assert spread(seen["new"]) < 0.5 * spread(seen["old"])  # what the per-tensor quantizer sees is evener
    for figures in report["layers"].values():
        assert figures["range_ratio_after"] < figures["range_ratio_before"]


def test_reparam_reduces_w8a8_error(tiny_model):
    structured(tiny_model)
    calib, held = _data()
    errs = {}
    for reparam in (False, True):
        model = copy.deepcopy(tiny_model)
        if reparam:
            reparam_layernorm_(model, calib)
        fp = copy.deepcopy(model)
        quantize(model, PRESETS["W8A8"], batches_loop(calib))
        errs[reparam] = block_errors(model, fp, held)
    for with_r, without in zip(errs[True]["blocks"], errs[False]["blocks"], strict=True):
        assert with_r["nmse"] < 0.8 * without["nmse"]
    assert errs[True]["logits"]["nmse"] < errs[False]["logits"]["nmse"]


def test_refuses_calibrated_activations(tiny_model):
    calib, _ = _data()
    quantize(tiny_model, PRESETS["W8A8"], batches_loop(calib[:4]))
    with pytest.raises(ValueError, match="before quantize"):
        reparam_layernorm_(tiny_model, calib[:4])
    with pytest.raises(ValueError, match="alpha"):
        reparam_layernorm_(tiny_model, calib[:4], alpha=2.0)
