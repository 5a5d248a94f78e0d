"""The graph's compute type: FP16 for TensorRT, FP32 kept for CPU runtimes.

TensorRT builds Q/DQ graphs strongly typed and keeps the graph's own types: a ``DequantizeLinear``'s output type
is its scale's type (NvInfer.h 10.3, ``IDequantizeLayer``), so a graph typed FP32 runs FP32 between its integer
matmuls. :func:`to_fp16` converts every float tensor of an exported graph to FP16 (weights, biases, LayerNorm
affines, Q/DQ scales, which ONNX allows in FP16 from opset 19), leaves INT8/INT4 integers and zero points as they
are, and keeps the graph's input and output FP32 with one ``Cast`` each, so apps still feed float32.

FP8 and FP4 tensors are not float to the converter, so FLOAT8E4M3FN / FLOAT4E2M1 weights and zero points stay as they
are; FP8 Q/DQ scales become FP16 like INT8 ones (Model Optimizer's FP8 export writes its scales in the graph's
16-bit type: ``_fp8_quantize`` / ``_fp8_dequantize``, "TRT StronglyType only supports FP16 QDQs"). NVFP4's nodes
(:func:`~dfq_deploy.export.onnx.nvfp4_nodes`) stay FP32 with a ``Cast`` to FP16 before the MatMul, as in Model
Optimizer's NVFP4 graphs (FP32 global scales; ``nvfp4_exporter`` casts the MatMul inputs to the 16-bit type).

The converter is onnxconverter-common's ``convert_float_to_float16`` (ONNX's own converter package, a few
pure-Python dependencies): it converts initializers, ``Constant`` nodes, ``Cast`` targets and value infos, and
only touches float tensors, which is exactly the QDQ rule. Nodes whose values are too large for FP16 stay FP32
(``keep_fp32``, chosen from the calibration images by :func:`~dfq_deploy.export.islands.fp32_islands`, as NVIDIA's
AutoCast chooses them: it keeps a node in FP32 when its inputs or outputs exceed ``data_max``, 512 by default);
the converter puts a ``Cast`` on each side of such a node. AutoCast itself (``modelopt.onnx.autocast``) would bring
nvidia-modelopt and its GPU-oriented dependencies into a CPU export. Two more things are done around the
converter: values beyond FP16's range raise (the converter would clip them silently), and the one ``Cast`` per
consumer it puts on the input is merged into one.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Collection

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from dfq_deploy.errors import DfqError

logger = logging.getLogger(__name__)

#: Largest finite float16.
FP16_MAX = float(np.finfo(np.float16).max)
#: Smallest positive (subnormal) float16: smaller magnitudes become this instead of 0.
FP16_TINY = float(2.0**-24)
#: Smallest normal float16: smaller Q/DQ scales lose precision in FP16 (logged).
FP16_MIN_NORMAL = float(np.finfo(np.float16).tiny)
#: ONNX element type of each graph dtype.
ELEM_TYPES = {"fp16": TensorProto.FLOAT16, "fp32": TensorProto.FLOAT}


def graph_dtype(proto: onnx.ModelProto) -> str:
    """``"fp16"`` when ``proto`` computes in FP16 (it has FP16 initializers; FP32 ones only in its FP32 islands),
    else ``"fp32"``."""
    types = {t.data_type for t in proto.graph.initializer}
    return "fp16" if TensorProto.FLOAT16 in types else "fp32"


def to_fp16(proto: onnx.ModelProto, keep_fp32: Collection[str] = ()) -> onnx.ModelProto:
    """An FP16-typed copy of the FP32 graph ``proto`` with FP32 input and output (see the module docstring).

    Args:
        proto: the FP32 export.
        keep_fp32: names of nodes that stay FP32 (islands, with a ``Cast`` on each side).

    Raises:
        DfqError: onnxconverter-common is missing, or a float constant does not fit in FP16.
    """
    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise DfqError("FP16 export needs onnxconverter-common: pip install onnxconverter-common "
                       "(or export --dtype fp32)") from exc
    if graph_dtype(proto) == "fp16":
        raise DfqError("the graph is already FP16: convert the FP32 export")
    islands = set(keep_fp32)
    if islands:
        proto = _unshare_island_constants(proto, islands)
    _check_range(proto, islands)
    with warnings.catch_warnings():  # one warning per weight below FP16_TINY, which becomes FP16_TINY
        warnings.simplefilter("ignore", UserWarning)
        out = float16.convert_float_to_float16(proto, min_positive_val=FP16_TINY, max_finite_val=FP16_MAX,
                                               keep_io_types=True, op_block_list=[],
                                               node_block_list=sorted(islands))
    _merge_input_casts(out)
    left = float_tensors(out, islands)
    if left:
        raise DfqError(f"FP16 conversion left {len(left)} FP32 tensor(s) inside the graph (first: {left[0]})")
    _log_subnormal_scales(out)
    return out


def _unshare_island_constants(proto: onnx.ModelProto, islands: set[str]) -> onnx.ModelProto:
    """A copy in which an island node has its own copy of every initializer it shares with an FP16 node.

    The exporter merges equal constants (e.g. LayerNorm weights that are all ones), and the converter keeps a
    shared initializer FP32 when one of its users stays FP32, which would hand the FP16 users an FP32 weight.
    """
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    inits = {t.name: t for t in out.graph.initializer}
    users: dict[str, set[bool]] = {}
    for n in out.graph.node:
        for t in n.input:
            users.setdefault(t, set()).add(n.name in islands)
    shared = {t for t, kinds in users.items() if t in inits and kinds == {True, False}}
    for n in out.graph.node:
        if n.name not in islands:
            continue
        for i, t in enumerate(n.input):
            if t in shared:
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[t])
                copy.name = f"{t}_fp32_{n.name}"
                out.graph.initializer.append(copy)
                n.input[i] = copy.name
    return out


def _log_subnormal_scales(proto: onnx.ModelProto) -> None:
    """Warn when Q/DQ scales fall below FP16's normal range (kept, with fewer significant bits; parity compares
    the graph with the model's scales rounded the same way)."""
    consts = {t.name: t for t in proto.graph.initializer}
    scales = {n.input[1] for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    small = [name for name in scales if name in consts and consts[name].data_type == TensorProto.FLOAT16
             and float(np.abs(numpy_helper.to_array(consts[name]).astype(np.float32)).min()) < FP16_MIN_NORMAL]
    if small:
        logger.warning("%d Q/DQ scale tensor(s) hold values below FP16's normal range (%.3g), e.g. %s: they keep "
                       "fewer significant bits (export --dtype fp32 keeps them exact)", len(small), FP16_MIN_NORMAL,
                       sorted(small)[0])


def _check_range(proto: onnx.ModelProto, islands: set[str]) -> None:
    from dfq_deploy.export.lint import constants

    in_islands = {t for n in proto.graph.node if n.name in islands for t in n.input}
    for t in constants(proto.graph).values():
        if t.data_type != TensorProto.FLOAT or t.name in in_islands:
            continue
        arr = numpy_helper.to_array(t)
        if arr.size and float(np.abs(arr).max()) > FP16_MAX:
            raise DfqError(f"constant {t.name} holds |{float(np.abs(arr).max()):.3g}| beyond the FP16 range "
                           f"({FP16_MAX:g}): export --dtype fp32")


def _merge_input_casts(proto: onnx.ModelProto) -> None:
    """One ``Cast`` per graph input: the converter adds one per consumer (e.g. the batch ``Shape`` and the stem)."""
    graph = proto.graph
    for inp in graph.input:
        casts = [n for n in graph.node if n.op_type == "Cast" and list(n.input) == [inp.name]]
        if len(casts) < 2:
            continue
        keep = casts[0]
        rename = {c.output[0]: keep.output[0] for c in casts[1:]}
        for n in graph.node:
            for i, name in enumerate(n.input):
                if name in rename:
                    n.input[i] = rename[name]
        for c in casts[1:]:
            graph.node.remove(c)
        drop = set(rename)
        kept_vi = [vi for vi in graph.value_info if vi.name not in drop]
        del graph.value_info[:]
        graph.value_info.extend(kept_vi)


def float_tensors(proto: onnx.ModelProto, islands: Collection[str] = ()) -> list[str]:
    """Names of FP32 tensors inside ``proto``, its input and output and the tensors of the FP32 ``islands`` (node
    names) aside (empty: it computes in FP16 everywhere else).
    """
    graph = onnx.shape_inference.infer_shapes(proto).graph
    skip = {v.name for v in list(graph.input) + list(graph.output)}
    skip |= {t for n in graph.node if n.name in islands for t in [*n.input, *n.output]}
    used = {t for n in graph.node for t in [*n.input, *n.output]}  # stale value infos aside
    names = [t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT and t.name not in skip]
    names += [v.name for v in graph.value_info
              if v.type.tensor_type.elem_type == TensorProto.FLOAT and v.name not in skip and v.name in used]
    return names
