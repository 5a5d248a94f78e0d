"""Corrected and reparameterised models export to the same QDQ graph shape and pass ONNX Runtime parity."""

from __future__ import annotations

import collections
import copy

import pytest
import torch

from dfq_deploy.config import PRESETS
from dfq_deploy.export.lint import lint_onnx
from dfq_deploy.export.onnx import to_onnx
from dfq_deploy.export.parity import compare_logits, reference_session, run_session, run_torch
from dfq_deploy.quant.correct import fit_corrections_
from dfq_deploy.quant.correct.fold import fold_corrections_
from dfq_deploy.quant.correct.reparam import reparam_layernorm_
from dfq_deploy.quant.qmodel import batches_loop, quantize
from tests.quant.test_correction import structured


def _shape(proto):
    return len(proto.graph.node), collections.Counter(n.op_type for n in proto.graph.node)


@pytest.mark.parametrize("preset, mode, reparam", [("W8A8", "full", True), ("W4A16", "diag", False)])
def test_corrected_export_keeps_graph_and_parity(tiny_model, preset, mode, reparam):
    structured(tiny_model)
    g = torch.Generator().manual_seed(1)
    calib, x = torch.randn(24, 3, 32, 32, generator=g), torch.randn(48, 3, 32, 32, generator=g)
    plain = quantize(copy.deepcopy(tiny_model), PRESETS[preset], batches_loop(calib))
    reference = _shape(to_onnx(plain, (3, 32, 32), dtype="fp32"))  # FP32: the numbers below are float32-exact

    if reparam:
        reparam_layernorm_(tiny_model, calib)
    fp = copy.deepcopy(tiny_model)
    quantize(tiny_model, PRESETS[preset], batches_loop(calib))
    fit_corrections_(tiny_model, fp, calib, mode)
    assert fold_corrections_(tiny_model) == 8
    proto = to_onnx(tiny_model, (3, 32, 32), dtype="fp32")
    assert _shape(proto) == reference
    assert lint_onnx(proto) == []
    # the corrected weights are what the graph carries: the parity of ORT with the folded fake-quant model
    par = compare_logits(run_torch(tiny_model, x), run_session(reference_session(proto), x))
    if preset == "W4A16":  # weight-only: float precision
        assert par["top1_agreement"] == 1.0 and par["max_abs_diff"] < 1e-4
    else:  # random-weight logits are nearly tied, and activation steps can flip on float rounding
        assert par["top1_agreement"] >= 0.9
        assert par["mean_abs_diff"] < 0.01 * par["logit_scale"]
