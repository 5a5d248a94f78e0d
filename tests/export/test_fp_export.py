"""FP8 and NVFP4 exports (issue #30): onnx.checker, the linter, parity on the graph that ships (ONNX Runtime for
FP8, ONNX's reference evaluator for NVFP4's FP4 weights), sabotage."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from dfq_deploy.config import PRESETS
from dfq_deploy.export.fp16 import graph_dtype
from dfq_deploy.export.lint import lint_onnx
from dfq_deploy.export.onnx import FP4_OPSET, TRT_DOMAIN, TRT_FP4_DYNAMIC_QUANTIZE, to_onnx
from dfq_deploy.export.parity import RUNTIMES, measure_parity, parity_probes
from dfq_deploy.models import TINY_CONFIGS, ModelSpec, create_model, data_config
from dfq_deploy.quant.recipe import quantize_
from tests.export import sabotage


def _export(family: str, preset: str, dtype: str = "fp16"):
    name, kwargs = TINY_CONFIGS[family]
    spec = ModelSpec(name, kwargs=dict(kwargs), random_weights=True)
    torch.manual_seed(0)
    model = create_model(spec)
    c, h, w = data_config(model)["input_size"]
    calib = torch.randn(16, c, h, w, generator=torch.Generator().manual_seed(3))
    quantize_(model, PRESETS[preset], calib, held=calib[:8], seed=0)
    return model, to_onnx(model, dtype=dtype, calib=calib), calib


def _parity(model, proto, calib, n_probes=64):
    return measure_parity(model, proto, {"calibration": calib, "held_back": parity_probes(calib, n_probes, 0)})


def _types(proto: onnx.ModelProto) -> set[int]:
    return {t.data_type for t in proto.graph.initializer}


@pytest.fixture(scope="module")
def fp8_deit():
    return _export("deit", "FP8")


@pytest.mark.parametrize("family", ["deit", pytest.param("swin", marks=pytest.mark.slow)])
def test_fp8_export_is_fp16_typed_linted_and_matches_in_onnxruntime(family, fp8_deit):
    model, proto, calib = fp8_deit if family == "deit" else _export(family, "FP8")
    onnx.checker.check_model(proto, full_check=True)
    assert lint_onnx(proto) == []
    assert graph_dtype(proto) == "fp16" and proto.opset_import[0].version >= 19
    assert TensorProto.FLOAT8E4M3FN in _types(proto) and TensorProto.INT8 not in _types(proto)
    fp8_weights = [t for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT8E4M3FN and len(t.dims) == 2]
    assert fp8_weights
    scales = {n.input[1] for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    assert {t.data_type for t in proto.graph.initializer if t.name in scales} == {TensorProto.FLOAT16}
    par = _parity(model, proto, calib)
    assert par["passed"], par["structure"]
    assert par["runtime"] == RUNTIMES["ort"]
    st = par["structure"]
    assert st["activation_qdq"]["graph"] == st["activation_qdq"]["model"] > 0
    assert st["weights"]["graph"] == st["weights"]["model"] > 0


def test_fp8_softmax_scale_is_one_over_448(fp8_deit):
    model = fp8_deit[0]
    attn = model.blocks[0].attn
    assert float(attn.p_quant.scale) == pytest.approx(1 / 448)


def test_fp32_fp8_graph_matches_to_float32_rounding():
    model, proto, calib = _export("deit", "FP8", dtype="fp32")
    par = _parity(model, proto, calib)
    assert par["passed"] and par["median_error"] < 1e-5


@pytest.mark.parametrize("factor", [4.0, 0.25])
def test_sabotaged_fp8_activation_scale_fails_parity(fp8_deit, factor):
    model, proto, calib = fp8_deit
    bad = sabotage.act_scale(proto, len(sabotage.act_dqs(proto)) - 1, factor)
    par = _parity(model, bad, calib)
    assert not par["passed"]
    assert any("activation Q/DQ pairs" in p for p in par["structure"]["problems"])


# DeiT's cases are slow (the reference evaluator is pure Python); the CLI test exports an NVFP4 DeiT in the fast set.
NVFP4_FAMILIES = [pytest.param("deit", marks=pytest.mark.slow), "swin"]


@pytest.mark.parametrize("family", NVFP4_FAMILIES)
def test_nvfp4_weight_only_graph_matches_in_the_reference_evaluator(family):
    model, proto, calib = _export(family, "NVFP4-W4A16")
    onnx.checker.check_model(proto, full_check=True)
    assert lint_onnx(proto) == []
    assert proto.opset_import[0].version == FP4_OPSET
    assert {TensorProto.FLOAT4E2M1, TensorProto.FLOAT8E4M3FN} <= _types(proto)
    par = _parity(model, proto, calib, n_probes=32)  # the reference evaluator is slow: fewer inputs
    assert par["runtime"] == RUNTIMES["reference"]  # ONNX's own FP4 DequantizeLinear: not simulated
    assert par["passed"], par["structure"]
    assert par["structure"]["weights"]["graph"] == par["structure"]["weights"]["model"] > 0
    # a wrong FP8 block scale in one weight is caught
    bad = copy.deepcopy(proto)
    t = next(t for t in bad.graph.initializer if t.data_type == TensorProto.FLOAT8E4M3FN)
    arr = numpy_helper.to_array(t).astype("float32")
    arr[0, 0] *= 2
    t.CopyFrom(numpy_helper.from_array(arr.astype(numpy_helper.to_array(t).dtype), t.name))
    assert not _parity(model, bad, calib[:4], n_probes=4)["checks"]["structure"]  # structure: no inputs needed


@pytest.mark.parametrize("family", NVFP4_FAMILIES)  # Swin: a 4-D patch-merging input, reshaped to 2-D
def test_nvfp4_w4a4_graph_follows_model_optimizer_and_is_labelled_simulated(family):
    model, proto, calib = _export(family, "NVFP4")
    onnx.checker.check_model(proto, full_check=True)
    assert lint_onnx(proto) == []
    dyn = [n for n in proto.graph.node if n.op_type == TRT_FP4_DYNAMIC_QUANTIZE]
    assert dyn and all(n.domain == TRT_DOMAIN for n in dyn)
    attrs = {a.name: a.i for a in dyn[0].attribute}
    assert attrs == {"axis": -1, "block_size": 16, "scale_type": TensorProto.FLOAT8E4M3FN}
    assert any(o.domain == TRT_DOMAIN for o in proto.opset_import)
    par = _parity(model, proto, calib, n_probes=32)
    assert par["runtime"] == RUNTIMES["reference+trt"] and "simulated" in par["runtime"]
    assert par["passed"], par["structure"]


def _fp4_dq_graph(block: int, axis: int = -1, opset: int = FP4_OPSET) -> onnx.ModelProto:
    import ml_dtypes
    import numpy as np

    w = numpy_helper.from_array(np.ones((8, 32), np.float32).astype(ml_dtypes.float4_e2m1fn), "w")
    s8 = numpy_helper.from_array(np.ones((8, 32 // block), np.float32).astype(ml_dtypes.float8_e4m3fn), "s8")
    g = numpy_helper.from_array(np.array(0.01, np.float32), "g")
    nodes = [helper.make_node("DequantizeLinear", ["s8", "g"], ["s"], name="dq1"),
             helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], name="dq2", axis=axis, block_size=block),
             helper.make_node("MatMul", ["x", "wt"], ["y"], name="mm"),
             helper.make_node("Transpose", ["wd"], ["wt"], name="t", perm=[1, 0])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [w, s8, g])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=11)


def test_lint_fp4_rules():
    assert lint_onnx(_fp4_dq_graph(16)) == []
    assert {v.rule for v in lint_onnx(_fp4_dq_graph(8))} == {"fp4"}  # block size 8
    assert "opset" in {v.rule for v in lint_onnx(_fp4_dq_graph(16, opset=21))}
    bad_op = _fp4_dq_graph(16)
    bad_op.graph.node.append(helper.make_node("TRT_FP8QuantizeLinear", ["x", "g"], ["z"], domain="trt"))
    assert "domain" in {v.rule for v in lint_onnx(bad_op)}


def test_lint_fp8_blocked_weight_is_refused():
    import ml_dtypes
    import numpy as np

    w = numpy_helper.from_array(np.ones((8, 32), np.float32).astype(ml_dtypes.float8_e4m3fn), "w")
    s = numpy_helper.from_array(np.ones((8, 2), np.float16), "s")
    node = helper.make_node("DequantizeLinear", ["w", "s"], ["y"], name="dq", axis=1, block_size=16)
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [8, 32])],
                              [w, s])
    rules = {v.rule for v in lint_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))}
    assert "fp8" in rules
