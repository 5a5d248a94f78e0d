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
