"""Per-layer overrides (``QuantConfig.layers``): resolution, validation, JSON, and one mixed graph end to end."""

from __future__ import annotations

import pytest
import torch

from dfq_deploy.config import PRESETS, W8A8, QuantConfig
from dfq_deploy.errors import DfqError
from dfq_deploy.export.lint import lint_onnx
from dfq_deploy.export.onnx import to_onnx
from dfq_deploy.export.parity import measure_parity, parity_probes
from dfq_deploy.models import TINY_CONFIGS, ModelSpec, create_model, data_config
from dfq_deploy.quant.qmodel import QuantLinear, quant_units
from dfq_deploy.quant.recipe import quantize_

MIXED = W8A8.with_(name="mixed", layers={
    "blocks.0.attn.qkv": "W4A16",
    "blocks.*.mlp.fc2": {"w_bits": 3, "w_granularity": "blockwise", "a_bits": None},
    "blocks.1.attn": "FP16",        # block 1's attention matmuls stay float
    "blocks.1.mlp.fc1": "FP16",
})


def test_for_layer_applies_the_last_matching_override():
    cfg = W8A8.with_(layers={"blocks.*": "W4A16", "blocks.1.*": "FP16"})
    assert cfg.for_layer("blocks.0.mlp.fc1").w_bits == 4 and cfg.for_layer("blocks.0.mlp.fc1").a_bits is None
    assert cfg.for_layer("blocks.1.mlp.fc1").w_bits is None
    assert cfg.for_layer("head") == W8A8  # no match: the base, without layers
    assert MIXED.for_layer("blocks.1.mlp.fc2").w_bits == 3  # a dict changes the base


def test_mixed_config_round_trips_and_hashes():
    again = QuantConfig.from_json(MIXED.to_json())
    assert again == MIXED and hash(again) == hash(MIXED)
    assert MIXED.deployable and not MIXED.is_float and MIXED.quantizes_activations
    assert MIXED.w_storage_bits == 8
    assert W8A8.with_(layers={"blocks.*": "W4A4"}).deployable is False


@pytest.mark.parametrize("layers, match", [
    ({"blocks.0.attn.qkv": "W9A9"}, "unknown preset"),
    ({"blocks.0.attn.qkv": {"io_bits": 8}}, "whole model"),
    ({"blocks.0.attn.qkv": {"w_bitz": 4}}, "w_bitz"),
    ({"blocks.0.attn.qkv": {"w_bits": 12}}, "w_bits=12"),
    ({"blocks.0.attn.qkv": 4}, "neither a preset"),
])
def test_bad_overrides_are_refused_in_one_line(layers, match):
    with pytest.raises(DfqError, match=match):
        W8A8.with_(layers=layers)


def test_quant_units_name_linears_and_attention_groups():
    name, kwargs = TINY_CONFIGS["swin"]
    units = quant_units(create_model(ModelSpec(name, kwargs=dict(kwargs), random_weights=True)))
    kinds = dict(units)
    assert kinds["layers.0.blocks.0.attn.qkv"] == "linear" and kinds["layers.0.blocks.0.attn"] == "attn"
    assert sum(k == "attn" for k in kinds.values()) == 4
    assert any(n.endswith("downsample.reduction") for n in kinds)  # Swin's patch merging is a unit


def test_mixed_graph_exports_lints_and_passes_parity():
    name, kwargs = TINY_CONFIGS["deit"]
    spec = ModelSpec(name, kwargs=dict(kwargs), random_weights=True)
    torch.manual_seed(0)
    model = create_model(spec)
    c, h, w = data_config(model)["input_size"]
    calib = torch.randn(16, c, h, w, generator=torch.Generator().manual_seed(3))
    quantize_(model, MIXED, calib, held=calib[:8])
    mods = dict(model.named_modules())
    assert mods["blocks.0.attn.qkv"].weight_quantizer.block_size is not None
    assert mods["blocks.0.attn.qkv"].input_quantizer is None
    assert not isinstance(mods["blocks.1.mlp.fc1"], QuantLinear)
    assert hasattr(mods["blocks.0.attn"], "q_quant") and not hasattr(mods["blocks.1.attn"], "q_quant")
    assert mods["blocks.1.mlp.fc2"].weight_quantizer.bits == 3
    proto = to_onnx(model, calib=calib)
    assert lint_onnx(proto) == []
    par = measure_parity(model, proto, {"calibration": calib, "held_back": parity_probes(calib, 64, 0)})
    assert par["passed"], par["structure"]
    st = par["structure"]
    assert st["weights"]["graph"] == st["weights"]["model"] == 7  # 8 block Linears, one left float
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and any(a.name == "block_size"
                                                                                for a in n.attribute)]
    assert len(dq) == 3  # qkv of block 0 and both fc2 are blocked INT4
    assert PRESETS["W8A8"].layers is None
