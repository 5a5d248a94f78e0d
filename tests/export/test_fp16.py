"""The FP16 conversion: every float tensor FP16 inside, FP32 input and output with one Cast each, range errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dfq_deploy.errors import DfqError
from dfq_deploy.export.fp16 import FP16_MAX, float_tensors, graph_dtype, to_fp16
from dfq_deploy.export.onnx import export_float_onnx


@pytest.fixture
def float_graph(tiny_model) -> onnx.ModelProto:
    return export_float_onnx(tiny_model, (3, 32, 32))


def test_fp16_graph_keeps_fp32_io_with_one_cast_each(float_graph):
    assert graph_dtype(float_graph) == "fp32" and float_tensors(float_graph)  # the FP32 graph has FP32 inside
    half = to_fp16(float_graph)
    assert graph_dtype(half) == "fp16" and float_tensors(half) == []
    graph = half.graph
    for vi in (*graph.input, *graph.output):
        assert vi.type.tensor_type.elem_type == TensorProto.FLOAT
    casts = [n for n in graph.node if n.op_type == "Cast"]
    # the input feeds the batch Shape and the stem: the converter's two Casts are merged into one
    assert sorted((n.input[0] == graph.input[0].name, n.output[0] == graph.output[0].name) for n in casts) == [
        (False, True), (True, False)]
    onnx.checker.check_model(half, full_check=True)


def _graph_with_constant(value: float) -> onnx.ModelProto:
    c = numpy_helper.from_array(np.array([value, 1.0], dtype=np.float32), "big")
    graph = helper.make_graph([helper.make_node("Mul", ["x", "big"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [c])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_values_beyond_fp16_range_raise_instead_of_clipping():
    assert graph_dtype(to_fp16(_graph_with_constant(FP16_MAX))) == "fp16"
    with pytest.raises(DfqError, match="constant big holds .* beyond the FP16 range .*--dtype fp32"):
        to_fp16(_graph_with_constant(2 * FP16_MAX))


def test_fp16_graph_is_not_converted_twice(float_graph):
    with pytest.raises(DfqError, match="already FP16"):
        to_fp16(to_fp16(float_graph))


def _scaled_block_model(factor: float):
    """The tiny DeiT with block 0's MLP output scaled up: the residual stream after it reaches thousands, beyond
    what FP16 LayerNorms and adds should see (the case NVIDIA's AutoCast keeps in FP32)."""
    import torch

    from dfq_deploy.models import ModelSpec, create_model
    from tests.conftest import TINY_KWARGS

    torch.manual_seed(0)
    model = create_model(ModelSpec("deit_t", kwargs=dict(TINY_KWARGS), random_weights=True))
    with torch.no_grad():
        model.blocks[0].mlp.fc2.weight.mul_(factor)
        model.blocks[0].mlp.fc2.bias.mul_(factor)
    return model


def test_large_activations_get_fp32_islands_and_parity_holds():
    import torch

    from dfq_deploy.config import W8A8
    from dfq_deploy.export.islands import FP32_ABOVE, tensor_magnitudes
    from dfq_deploy.export.onnx import export_float_onnx, fp32_nodes, to_onnx
    from dfq_deploy.export.ort import ort_session
    from dfq_deploy.export.parity import measure_parity, parity_probes
    from dfq_deploy.quant.qmodel import batches_loop, quantize

    model = _scaled_block_model(20000.0)
    calib = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    peak = tensor_magnitudes(export_float_onnx(model, (3, 32, 32)), calib)
    assert max(peak.values()) > 4 * FP32_ABOVE  # the scaled block really produces large values
    quantize(model, W8A8, batches_loop(calib))
    proto = to_onnx(model, dtype="fp16", calib=calib)
    islands = fp32_nodes(proto)
    assert islands and any("LayerNorm" in r for r in islands.values()) and any("Add" in r for r in islands.values())
    assert all(float(r.split("reaches ")[1].split(" ")[0]) > FP32_ABOVE for r in islands.values())
    kept = {n.name for n in proto.graph.node} & set(islands)
    assert kept == set(islands)  # the island nodes are in the graph, computing in FP32 between Casts
    assert float_tensors(proto, islands) == [] and float_tensors(proto)  # FP32 only inside the islands
    par = measure_parity(model, proto, {"calibration": calib, "held_back": parity_probes(calib, 32, 0)})
    assert par["passed"], {k: par[k] for k in ("calibration", "held_back", "structure")}
    # without the islands the same graph is typed FP16 throughout: ORT runs it, and parity or not, the report
    # says nothing was kept; with them the top-1 of the FP16 graph equals the FP32 graph's on these inputs
    fp32 = ort_session(to_onnx(model, dtype="fp32"), optimize=False)
    fp16 = ort_session(proto, optimize=False)
    x = calib.numpy()
    name = fp16.get_inputs()[0].name
    assert (fp16.run(None, {name: x})[0].argmax(-1) == fp32.run(None, {name: x})[0].argmax(-1)).mean() >= 0.9


def test_the_bundled_model_is_fp16_throughout():
    import torch

    from dfq_deploy.export.islands import FP32_ABOVE, fp32_islands, tensor_magnitudes
    from dfq_deploy.models import ModelSpec, create_model

    model = create_model(ModelSpec())
    calib = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    proto = export_float_onnx(model, (3, 32, 32))
    assert fp32_islands(proto, calib) == {}
    peak = tensor_magnitudes(proto, calib)
    ln_inputs = [peak[n.input[0]] for n in proto.graph.node if n.op_type == "LayerNormalization"]
    assert ln_inputs and max(ln_inputs) < FP32_ABOVE / 4  # about 40 on noise: far from the limit
