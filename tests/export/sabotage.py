"""Ways to break an exported QDQ graph, each the kind of bug an exporter can make. Each returns a broken copy."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper


def _inits(proto: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in proto.graph.initializer}


def _set(proto: onnx.ModelProto, name: str, arr: np.ndarray) -> None:
    t = _inits(proto)[name]
    t.CopyFrom(numpy_helper.from_array(arr.astype(numpy_helper.to_array(t).dtype), name))


def weight_dqs(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    inits = _inits(proto)
    return [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]


def act_dqs(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    inits = _inits(proto)
    return [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in inits]


def layer_scale(proto: onnx.ModelProto, k: int) -> onnx.ModelProto:
    """Weight ``k``'s scales all 25% too large."""
    p = copy.deepcopy(proto)
    n = weight_dqs(p)[k]
    _set(p, n.input[1], numpy_helper.to_array(_inits(p)[n.input[1]]) * 1.25)
    return p


def channel_scale(proto: onnx.ModelProto, k: int) -> onnx.ModelProto:
    """One output channel of weight ``k`` with twice its scale."""
    p = copy.deepcopy(proto)
    n = weight_dqs(p)[k]
    s = numpy_helper.to_array(_inits(p)[n.input[1]]).copy()
    s[..., 0] *= 2
    _set(p, n.input[1], s)
    return p


def zero_point(proto: onnx.ModelProto, k: int) -> onnx.ModelProto:
    """Activation pair ``k``'s DequantizeLinear reads zero point 1 while its QuantizeLinear uses 0."""
    p = copy.deepcopy(proto)
    n = act_dqs(p)[k]
    name = n.input[2] + "_swapped"
    p.graph.initializer.append(numpy_helper.from_array(np.array(1, np.int8), name))
    n.input[2] = name
    return p


def missing_qdq(proto: onnx.ModelProto, k: int) -> onnx.ModelProto:
    """Activation Q/DQ pair ``k`` removed (its consumer reads the float tensor)."""
    p = copy.deepcopy(proto)
    dq = act_dqs(p)[k]
    q = next(n for n in p.graph.node if n.output[0] == dq.input[0])
    for n in p.graph.node:
        for i, name in enumerate(n.input):
            if name == dq.output[0]:
                n.input[i] = q.input[0]
    p.graph.node.remove(dq)
    p.graph.node.remove(q)
    return p


def block_shift(proto: onnx.ModelProto, k: int) -> onnx.ModelProto:
    """Blocked INT4 weight ``k``'s block scales off by one block (each block reads its neighbour's scale)."""
    p = copy.deepcopy(proto)
    n = [n for n in weight_dqs(p) if any(a.name == "block_size" for a in n.attribute)][k]
    attrs = {a.name: a.i for a in n.attribute}
    _set(p, n.input[1], np.roll(numpy_helper.to_array(_inits(p)[n.input[1]]), 1, axis=attrs["axis"]))
    return p


def transposed(proto: onnx.ModelProto, k: int) -> onnx.ModelProto:
    """Square weight ``k`` stored transposed."""
    p = copy.deepcopy(proto)
    inits = _inits(p)
    n = [n for n in weight_dqs(p) if len(set(inits[n.input[0]].dims)) == 1][k]
    _set(p, n.input[0], numpy_helper.to_array(inits[n.input[0]]).T.copy())
    return p


def act_scale(proto: onnx.ModelProto, k: int, factor: float = 4.0) -> onnx.ModelProto:
    """Activation pair ``k``'s scale (shared by its Q and DQ) times ``factor``: a wrongly calibrated range."""
    p = copy.deepcopy(proto)
    n = act_dqs(p)[k]
    _set(p, n.input[1], numpy_helper.to_array(_inits(p)[n.input[1]]).astype(np.float32) * factor)
    return p


SABOTAGES: dict[str, Callable[[onnx.ModelProto, int], onnx.ModelProto]] = {
    "layer_scale": layer_scale, "channel_scale": channel_scale, "zero_point": zero_point,
    "missing_qdq": missing_qdq, "block_shift": block_shift, "transposed": transposed,
}
