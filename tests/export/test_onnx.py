"""Export of tiny random-weight models: graph shape, TensorRT rules, and ONNX Runtime parity."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from dfq_deploy.config import PRESETS
from dfq_deploy.export.lint import check_onnx, lint_onnx
from dfq_deploy.export.onnx import to_onnx
from dfq_deploy.export.parity import compare_logits, measure_parity, reference_session, run_session, run_torch
from dfq_deploy.models import TINY_CONFIGS, ModelSpec, create_model, data_config
from dfq_deploy.quant.qmodel import attention_modules, batches_loop, quantize

DTYPES = ["fp16", "fp32"]
FLOAT = {"fp16": TensorProto.FLOAT16, "fp32": TensorProto.FLOAT}


def _export(model, name, dtype="fp16"):
    torch.manual_seed(1)
    x = torch.randn(48, 3, 32, 32)
    quantize(model, PRESETS[name], batches_loop(x[:24]))
    return to_onnx(model, (3, 32, 32), dtype=dtype), x


def _close(proto, model, x, dtype, fp32_atol):
    """ORT's logits of ``proto`` agree with ``model``'s: to float32 precision, or within FP16 rounding."""
    par = compare_logits(run_torch(model, x), run_session(reference_session(proto), x))
    if dtype == "fp32":
        return par["max_abs_diff"] < fp32_atol
    return par["max_abs_diff"] < 0.02 * par["logit_scale"]


def _ops(proto):
    return collections.Counter(n.op_type for n in proto.graph.node)


@pytest.mark.parametrize("dtype", DTYPES)
def test_float_export_is_clean(tiny_model, dtype):
    proto = to_onnx(tiny_model, (3, 32, 32), dtype=dtype)
    ops = _ops(proto)
    assert proto.opset_import[0].version == 21
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 0
    assert ops["MatMul"] == 2 * 6 and ops["Softmax"] == 2 and ops["LayerNormalization"] == 5
    assert ops["Cast"] == (2 if dtype == "fp16" else 0)  # FP32 input and output, one Cast each
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    assert {t.data_type for t in proto.graph.initializer if t.data_type in FLOAT.values()} == {FLOAT[dtype]}
    assert [v.type.tensor_type.elem_type for v in (*proto.graph.input, *proto.graph.output)] == [TensorProto.FLOAT] * 2
    assert _close(proto, tiny_model, torch.randn(4, 3, 32, 32), dtype, fp32_atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_w8a8_graph_and_parity(tiny_model, dtype):
    proto, x = _export(tiny_model, "W8A8", dtype)
    ops = _ops(proto)
    # 2 blocks x (4 Linear inputs + 4 attention matmul inputs + the P·V output) activation Q/DQ
    assert ops["QuantizeLinear"] == 18
    assert ops["DequantizeLinear"] == 18 + 8  # + one per quantized weight
    assert lint_onnx(proto) == []
    inits = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            w = inits[node.input[0]]
            assert w.data_type == TensorProto.INT8
            axis = {a.name: a.i for a in node.attribute}["axis"]
            assert axis == 1  # MatMul stores W^T [K, N]: output channels on axis 1
            assert numpy_helper.to_array(inits[node.input[1]]).shape == (w.dims[1],)
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert inits[node.input[1]].data_type == FLOAT[dtype]  # FP16 scales: FP16 outputs in TensorRT
        if node.op_type == "QuantizeLinear":
            assert numpy_helper.to_array(inits[node.input[1]]).shape == ()
            assert numpy_helper.to_array(inits[node.input[2]]).tolist() == 0
    par = compare_logits(run_torch(tiny_model, x), run_session(reference_session(proto), x))
    # random-weight logits are nearly tied, and float rounding flips single activation steps now and then (FP16
    # rounding more often; tests/export/test_parity.py judges both against the measured rounding null)
    assert par["top1_agreement"] >= 0.9
    assert par["mean_abs_diff"] < {"fp32": 0.01, "fp16": 0.05}[dtype] * par["logit_scale"]


@pytest.mark.parametrize("name, block, dtype", [("W4A16", 64, "fp16"), ("W4A16", 64, "fp32"), ("W3A16", 64, "fp16"),
                                               ("W2A16", 64, "fp32")])
def test_int4_weight_only(tiny_model, name, block, dtype):
    proto, x = _export(tiny_model, name, dtype)
    ops = _ops(proto)
    assert ops["QuantizeLinear"] == 0 and ops["DequantizeLinear"] == 8  # the block Linears; the head stays float
    assert lint_onnx(proto) == []
    inits = {t.name: t for t in proto.graph.initializer}
    bits = int(name[1])
    for node in proto.graph.node:
        if node.op_type == "Gemm":  # the classifier head: a float weight, FP16 in an FP16 graph
            head = inits[node.input[1]]
            assert head.data_type == {"fp16": TensorProto.FLOAT16, "fp32": TensorProto.FLOAT}[dtype]
        if node.op_type == "DequantizeLinear":
            attrs = {a.name: a.i for a in node.attribute}
            w = inits[node.input[0]]
            assert w.data_type == TensorProto.INT4
            assert attrs["axis"] == 0 and attrs["block_size"] in (block, 128)
            ints = numpy_helper.to_array(w).astype(np.int64)
            assert ints.min() >= -(2 ** (bits - 1)) and ints.max() <= 2 ** (bits - 1) - 1
            scale = numpy_helper.to_array(inits[node.input[1]])
            assert scale.shape == (w.dims[0] // attrs["block_size"], w.dims[1]) and (scale > 0).all()
            assert scale.dtype == {"fp16": np.float16, "fp32": np.float32}[dtype]
    # weight-only: ORT reproduces the fake-quant model to float precision (FP32) or within FP16 rounding
    assert _close(proto, tiny_model, x, dtype, fp32_atol=1e-4)


@pytest.mark.parametrize("dtype, float_bytes", [("fp16", 2), ("fp32", 4)])
def test_int4_file_is_small(tiny_model, dtype, float_bytes):
    import copy

    fp = to_onnx(copy.deepcopy(tiny_model), (3, 32, 32), dtype=dtype)
    q, _ = _export(tiny_model, "W4A16", dtype)
    lin = sum(p.numel() for n, p in tiny_model.named_parameters() if "blocks" in n and n.endswith("weight")
              and p.ndim == 2)
    saved = len(fp.SerializeToString()) - len(q.SerializeToString())
    assert saved > 0.8 * lin * (float_bytes - 0.5)  # bytes saved per 4-bit block weight


def test_dynamic_batch(tiny_model):
    proto, _ = _export(tiny_model, "W8A8")
    sess = reference_session(proto)
    for b in (1, 3, 7):
        assert run_session(sess, torch.randn(b, 3, 32, 32)).shape == (b, 10)


def test_export_roundtrips_through_file(tiny_model, tmp_path):
    from dfq_deploy.export.onnx import save_onnx

    proto, _ = _export(tiny_model, "W4A16")
    path = save_onnx(proto, tmp_path / "m.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    assert lint_onnx(path) == []
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_w8a8_attention_has_the_fused_attention_pattern(family):
    """Q/DQ before both batched matmuls, after the softmax and on the P·V output with the proj input's scale."""
    name, kwargs = TINY_CONFIGS[family]
    torch.manual_seed(0)
    model = create_model(ModelSpec(name, kwargs=dict(kwargs), random_weights=True))
    c, h, w = data_config(model)["input_size"]
    quantize(model, PRESETS["W8A8"], batches_loop(torch.randn(8, c, h, w)))
    proto = to_onnx(model)
    assert lint_onnx(proto) == []
    graph = proto.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    users = collections.defaultdict(list)
    for n in graph.node:
        for i in n.input:
            users[i].append(n)
    pv_scales = []
    for n in graph.node:
        if n.op_type == "MatMul" and not any(i in inits for i in n.input) and "pv_out" in users[n.output[0]][0].name:
            (q,) = users[n.output[0]]
            assert q.op_type == "QuantizeLinear"
            pv_scales.append(float(inits[q.input[1]]))
    attns = attention_modules(model)
    assert pv_scales == [float(np.float16(a.proj.input_quantizer.scale.item())) for a in attns]
    # without the P·V output pairs, the linter names the missing pattern at every attention
    broken = onnx.ModelProto()
    broken.CopyFrom(proto)
    for n in list(broken.graph.node):
        if "pv_out" in n.name and n.op_type == "QuantizeLinear":
            dq = next(m for m in broken.graph.node if m.op_type == "DequantizeLinear" and m.input[0] == n.output[0])
            for m in broken.graph.node:
                m.input[:] = [n.input[0] if i == dq.output[0] else i for i in m.input]
            broken.graph.node.remove(n)
            broken.graph.node.remove(dq)
    assert [v.rule for v in lint_onnx(broken)] == ["mha"] * len(attns)
    assert [v.rule for v in check_onnx(broken)] == ["mha"] * len(attns)  # advisory: reported, not raised


def test_attention_with_a_norm_before_proj_gets_no_pv_output_pair():
    """timm's post-attention norm changes values between P·V and proj: no pair with proj's scale there."""
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 4, "depth": 1, "num_classes": 10, "scale_attn_norm": True}
    model = create_model(ModelSpec("deit_t", kwargs=kwargs, random_weights=True))
    quantize(model, PRESETS["W8A8"], batches_loop(torch.randn(8, 3, 32, 32)))
    proto = to_onnx(model)
    assert not any("pv_out" in n.name for n in proto.graph.node)
    assert [v.rule for v in lint_onnx(proto)] == ["mha"]  # the advisory names the unfused attention
    x = torch.randn(16, 3, 32, 32)
    assert measure_parity(model, proto, {"probes": x}, 0.9)["passed"]
