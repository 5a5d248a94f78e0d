"""Block-wise reconstruction: trains each quantized block towards the float block outputs."""

from __future__ import annotations

import copy

import pytest
import torch

from dfq_deploy.config import PRESETS
from dfq_deploy.quant.correct import block_errors
from dfq_deploy.quant.correct.reconstruct import reconstruct_
from dfq_deploy.quant.qmodel import QuantLinear, batches_loop, quantize
from tests.quant.test_correction import structured


@pytest.mark.parametrize("preset", ["W4A16", "W4A4"])
def test_reconstruction_reduces_block_error(tiny_model, preset):
    structured(tiny_model)
    g = torch.Generator().manual_seed(1)
    calib, held = torch.randn(32, 3, 32, 32, generator=g), torch.randn(16, 3, 32, 32, generator=g)
    fp = copy.deepcopy(tiny_model)
    quantize(tiny_model, PRESETS[preset], batches_loop(calib))
    weights = {n: m.weight.detach().clone() for n, m in tiny_model.named_modules() if isinstance(m, QuantLinear)}
    others = {n: p.detach().clone() for n, p in tiny_model.named_parameters() if "norm" in n or "embed" in n}
    before = block_errors(tiny_model, fp, held)
    report = reconstruct_(tiny_model, fp, calib, iters=20, lr=1e-4, batch_size=16)
    after = block_errors(tiny_model, fp, held)
    assert len(report["blocks"]) == 2
    for b in report["blocks"]:
        assert b["loss_end"] < 0.9 * b["loss_start"]
        assert b["rescaled"] in (True, False)
    for a, b in zip(after["blocks"], before["blocks"], strict=True):
        assert a["nmse"] < 0.9 * b["nmse"]
    # only the blocks' Linear weights and biases were trained; nothing is left requiring grad state behind
    assert any(not torch.equal(m.weight, weights[n]) for n, m in tiny_model.named_modules() if n in weights)
    assert all(torch.equal(p, others[n]) for n, p in tiny_model.named_parameters() if n in others)
    assert all(p.grad is None for p in tiny_model.parameters())
    assert all(p.requires_grad for p in tiny_model.parameters())
    assert all(m.weight_quantizer.calibrated for m in tiny_model.modules() if isinstance(m, QuantLinear))
