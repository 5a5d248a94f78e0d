"""The TensorRT-rules linter on graphs built by hand, one broken rule at a time."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dfq_deploy.cli import main
from dfq_deploy.errors import DfqError
from dfq_deploy.export.lint import check_onnx, lint_onnx


def _model(nodes, inits, opset=21, extra_opsets=()):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def _f(name, arr):
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def good_graph(w_dtype=TensorProto.INT8, w_dims=(4, 4), block=0, scale_shape=(4,), act_scale=0.1, zp_val=0,
               zp_type=TensorProto.INT8, w_zp=None):
    """x -> Q -> DQ -> MatMul(DQ(W)) -> y: a TensorRT-style QDQ MatMul."""
    n = int(np.prod(w_dims))
    w = helper.make_tensor("w", w_dtype, list(w_dims), [1] * n)
    attrs = {"axis": 0 if block else 1}
    if block:
        attrs["block_size"] = block
    inits = [
        w, _f("w_s", np.full(scale_shape, 0.5)), _f("a_s", act_scale),
        helper.make_tensor("a_zp", zp_type, [], [zp_val]),
    ]
    w_inputs = ["w", "w_s"]
    if w_zp is not None:
        inits.append(w_zp)
        w_inputs.append(w_zp.name)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "a_s", "a_zp"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "a_s", "a_zp"], ["xd"], name="dq_x"),
        helper.make_node("DequantizeLinear", w_inputs, ["wd"], name="dq_w", **attrs),
        helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm"),
    ]
    return _model(nodes, inits)


def rules(model):
    return sorted({v.rule for v in lint_onnx(model)})


def test_good_graphs_pass_and_run():
    import onnxruntime as ort

    for model in (good_graph(), good_graph(TensorProto.INT4, (4, 4), block=2, scale_shape=(2, 4))):
        assert lint_onnx(model) == []
        onnx.checker.check_model(model, full_check=True)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        assert sess.run(None, {"x": np.ones((1, 4), np.float32)})[0].shape == (1, 4)


def test_nonzero_zero_point():
    assert rules(good_graph(zp_val=3)) == ["zero-point"]


def test_unsigned_type():
    assert "signed" in rules(good_graph(zp_type=TensorProto.UINT8))


@pytest.mark.parametrize("bad", [0.0, -0.1, float("inf"), float("nan")])
def test_bad_scales(bad):
    assert rules(good_graph(act_scale=bad)) == ["scale"]


def test_per_channel_activation():
    model = good_graph()
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "a_s"))
    model.graph.initializer.append(_f("a_s", [0.1, 0.2, 0.3, 0.4]))
    assert "per-channel-on-activation" in rules(model)


def test_int4_activation_quantization():
    model = good_graph()
    zp = next(t for t in model.graph.initializer if t.name == "a_zp")
    model.graph.initializer.remove(zp)
    model.graph.initializer.append(helper.make_tensor("a_zp", TensorProto.INT4, [], [0]))
    assert "int4" in rules(model)


def test_int4_odd_last_dim():
    model = good_graph(TensorProto.INT4, (4, 3), block=2, scale_shape=(2, 3))
    assert "int4" in rules(model)


def test_int4_needs_opset_21():
    model = good_graph(TensorProto.INT4, (4, 4), block=2, scale_shape=(2, 4))
    model.opset_import[0].version = 19
    assert "opset" in rules(model)


def test_blocked_scale_rank():
    model = good_graph(TensorProto.INT4, (4, 4), block=2, scale_shape=(8,))
    assert "scale" in rules(model)


@pytest.mark.parametrize("w_dtype, block, scale_shape", [
    (TensorProto.INT8, 2, (2, 4)),  # blocked, but not INT4
    (TensorProto.INT4, 3, (2, 4)),  # block size does not divide the blocked dimension
    (TensorProto.INT4, 2, (2, 2)),  # blocked scale of the wrong shape
])
def test_block_rules(w_dtype, block, scale_shape):
    assert "block" in rules(good_graph(w_dtype, (4, 4), block=block, scale_shape=scale_shape))


def test_per_axis_scale_length_is_the_axis():
    assert rules(good_graph(scale_shape=(3,))) == ["axis"]


def test_fp16_scales_need_opset_19():
    model = good_graph()
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "w_s"))
    model.graph.initializer.append(numpy_helper.from_array(np.full(4, 0.5, np.float16), "w_s"))
    assert lint_onnx(model) == []
    model.opset_import[0].version = 17
    assert rules(model) == ["opset"]


def test_nonstandard_domain():
    model = good_graph()
    model.graph.node.append(helper.make_node("Gelu", ["y"], ["z"], name="ms_gelu", domain="com.microsoft"))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    assert rules(model) == ["domain"]


def test_weight_zero_point_nonzero():
    zp = helper.make_tensor("w_zp", TensorProto.INT8, [4], [0, 0, 1, 0])
    assert rules(good_graph(w_zp=zp)) == ["zero-point"]


def test_check_onnx_raises_one_line(tmp_path):
    model = good_graph(zp_val=3)
    with pytest.raises(DfqError, match=r"breaks 2 TensorRT rule\(s\): \[zero-point\] q_x"):
        check_onnx(model)


def test_lint_cli(tmp_path, capsys):
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(good_graph(), good)
    onnx.save(good_graph(zp_val=3), bad)
    assert main(["lint", str(good)]) == 0
    assert main(["lint", str(bad)]) == 1
    assert "[zero-point]" in capsys.readouterr().out
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert main(["lint", str(tmp_path / "junk.onnx")]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err


def test_int8_weight_only_matmul_is_flagged():
    """An INT8 weight beside a float activation (the old W*A16 head) is no pattern TensorRT documents; INT4 blocked
    weight-only and INT8 with both inputs quantized are."""
    model = good_graph()
    nodes = [n for n in model.graph.node if n.name not in ("q_x", "dq_x")]
    nodes[-1].input[0] = "x"  # MatMul(x, DQ(W_int8)): weight-only INT8
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    assert rules(model) == ["weight-only-int8"]
    cast = helper.make_node("Transpose", ["wd"], ["wt"], name="t")  # through a value-preserving op, as a Gemm's
    nodes[-1].input[1] = "wt"
    del model.graph.node[:]
    model.graph.node.extend([*nodes[:-1], cast, nodes[-1]])
    assert rules(model) == ["weight-only-int8"]
    assert "weight-only-int8" not in rules(good_graph())  # both inputs dequantized
    int4 = good_graph(TensorProto.INT4, (4, 4), block=2, scale_shape=(2, 4))
    nodes = [n for n in int4.graph.node if n.name not in ("q_x", "dq_x")]
    nodes[-1].input[0] = "x"
    del int4.graph.node[:]
    int4.graph.node.extend(nodes)
    assert "weight-only-int8" not in rules(int4)  # INT4 blocked weight-only: documented


def test_exported_weight_only_graphs_hold_no_int8_weight_only_matmul(tiny_model):
    from dfq_deploy.config import PRESETS
    from dfq_deploy.export.onnx import to_onnx
    from dfq_deploy.quant.qmodel import quantize

    old_head = PRESETS["W4A16"].with_(head_w_bits=8)  # the head as the previous revision shipped it
    assert not old_head.deployable and PRESETS["W4A16"].deployable
    quantize(tiny_model, old_head)
    with pytest.raises(DfqError, match="weight-only-int8") as err:  # the head's Gemm: the export refuses it
        to_onnx(tiny_model, dtype="fp16")
    assert str(err.value).count("weight-only-int8") == 1
