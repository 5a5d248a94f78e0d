"""TensorRT explicit-quantization rules, checked on an ONNX graph.

Rules (NVIDIA's NvInfer.h / onnx-tensorrt importer / TensorRT docs, summarised in the project's design notes):

* ``zero-point``: every Q/DQ zero point is a constant of all zeros (symmetric quantization only);
* ``signed``: quantized types are signed (INT8 / INT4), never UINT8 / UINT4;
* ``scale``: scales are constants, finite and strictly positive; scalar for per-tensor, 1-D for per-axis,
  same rank as the input for blocked;
* ``per-channel-on-activation``: per-axis or blocked (de)quantization only on constant (weight) inputs;
* ``int4``: INT4 only as weight-only: an INT4 constant feeding ``DequantizeLinear``, even last dimension; no
  ``QuantizeLinear`` to INT4;
* ``block``: blocked ``DequantizeLinear`` only on 2-D INT4 constants, with a block size that divides the
  blocked dimension exactly and a scale of the input's shape with that dimension divided by the block size;
* ``axis``: a per-axis scale has one entry for each index of the quantized axis;
* ``opset``: INT4 or blocked quantization needs opset >= 21, FP16 / BF16 scales opset >= 19;
* ``mha`` (advisory: TensorRT parses and builds the graph without it, but cannot fuse the attention): where an
  attention matmul (a MatMul of two activations) has a quantized input, both inputs are dequantized, and the
  output of the second (P·V: the one fed by the softmax) feeds a ``QuantizeLinear``: TensorRT's fused INT8
  attention needs Q/DQ before the first batched matmul, after the softmax and after the second batched matmul
  (TensorRT developer guide, quoted in NVIDIA/TensorRT issues 2981 and 4167);
* ``domain``: only standard-domain ops (TensorRT cannot parse ``com.microsoft`` ops), and exactly one TensorRT op:
  ``trt::TRT_FP4DynamicQuantize`` with ``axis=-1``, ``block_size=16``, ``scale_type=FLOAT8E4M3FN``, the dynamic FP4
  block quantization of NVFP4 activations as Model Optimizer exports it
  (``modelopt/torch/quantization/export_onnx.py``, ``_fp4_dynamic_quantize``), followed by its two DequantizeLinear;
* ``fp8``: FP8 (FLOAT8E4M3FN) Q/DQ per tensor on activations, per channel (1-D scale) or per tensor on weights,
  never blocked; opset >= 19 (TensorRT "Working with Quantized Types": FP8 quantizes weights per tensor or per
  channel and activations per tensor; FLOAT8E4M3FN Q/DQ are ONNX opset 19);
* ``fp4``: FP4 (FLOAT4E2M1) only in a ``DequantizeLinear`` blocked with block size 16 along the last (input)
  dimension, whose scale is itself ``DequantizeLinear(FP8 block scales, constant scalar global scale)`` (two-level
  NVFP4 scaling, Model Optimizer's ``nvfp4_exporter``); the FP4 values are a 2-D constant (weights) or the first
  output of ``TRT_FP4DynamicQuantize`` (activations); opset >= 23 (FLOAT4E2M1 ``DequantizeLinear``, ONNX 1.18);
* ``weight-only-int8``: a MatMul/Gemm whose weight is dequantized from INT8 while its activation input is not
  dequantized. TensorRT documents weight-only quantization for INT4 blocked weights only (developer guide,
  "Working with Quantized Types": weight-only quantization (WoQ) with INT4 block quantization); an INT8 weight
  needs its activation quantized too (explicit INT8 Q/DQ on both inputs), or the layer stays in float.

Run it as ``dfq-deploy lint model.onnx``; every export runs it and fails on a violation of a rule other than the
advisory ones (:data:`ADVISORY_RULES`), which it logs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from dfq_deploy.errors import DfqError

logger = logging.getLogger(__name__)

_SIGNED = {TensorProto.INT8, TensorProto.INT4}
_UNSIGNED = {TensorProto.UINT8, TensorProto.UINT4, TensorProto.UINT16, TensorProto.INT16}
_STANDARD_DOMAINS = ("", "ai.onnx")
_HALF_SCALES = {TensorProto.FLOAT16, TensorProto.BFLOAT16}
_FP8, _FP4 = TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT4E2M1
#: The one TensorRT-domain op an exported graph may hold, with the attributes Model Optimizer gives it.
TRT_OPS = {("trt", "TRT_FP4DynamicQuantize"): {"axis": -1, "block_size": 16, "scale_type": TensorProto.FLOAT8E4M3FN}}
NVFP4_BLOCK = 16
#: Rules whose violation makes a slower engine, not a graph TensorRT refuses: reported, never raised.
ADVISORY_RULES = frozenset({"mha"})


@dataclass(frozen=True)
class Violation:
    """One broken rule at one node."""

    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node}: {self.message}"


def load_onnx(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    """``model`` itself, or the ONNX file it names (a one-line DfqError when missing or unreadable)."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise DfqError(f"ONNX file not found: {path}")
    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise DfqError(f"{path} is not a readable ONNX model ({type(exc).__name__}): re-export it") from exc


def constants(graph: onnx.GraphProto) -> dict[str, TensorProto]:
    """Initializers and ``Constant`` node values of ``graph``, by tensor name."""
    consts = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t is not None:
                    consts[node.output[0]] = a.t
    return consts


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return a.i
    return default


def lint_onnx(model: onnx.ModelProto | str | Path) -> list[Violation]:
    """All violations of TensorRT's explicit-quantization rules in ``model`` (empty list: it passes)."""
    proto = load_onnx(model)
    graph = proto.graph
    consts = constants(graph)
    opset = max((o.version for o in proto.opset_import if o.domain in _STANDARD_DOMAINS), default=0)
    out: list[Violation] = []
    uses_int4_or_blocks = False
    half_scale = ""
    fp8_at = fp4_at = ""
    producers = {o: n for n in graph.node for o in n.output}
    dq_scales = {n.input[1] for n in graph.node if n.op_type == "DequantizeLinear" and len(n.input) > 1}
    shapes: dict[str, int] = {}

    def ranks() -> dict[str, int]:  # tensor ranks from shape inference, computed once when needed
        if not shapes:
            inferred = onnx.shape_inference.infer_shapes(proto).graph
            for v in [*inferred.value_info, *inferred.input, *inferred.output]:
                if v.type.tensor_type.HasField("shape"):
                    shapes[v.name] = len(v.type.tensor_type.shape.dim)
            shapes[""] = 0
        return shapes

    for i, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}#{i}"
        if node.domain not in _STANDARD_DOMAINS:
            want = TRT_OPS.get((node.domain, node.op_type))
            if want is None:
                out.append(Violation("domain", name, f"op {node.domain}::{node.op_type} is not a standard ONNX op "
                                     "(the one TensorRT op allowed is trt::TRT_FP4DynamicQuantize)"))
            else:
                got = {k: _attr(node, k, -99) for k in want}
                if got != want:
                    out.append(Violation("fp4", name, f"{node.op_type} attributes {got}, expected {want}"))
                rank = ranks().get(node.input[0])
                if rank is not None and rank not in (2, 3):  # TensorRT operator reference, "DynamicQuantize"
                    out.append(Violation("fp4", name, f"{node.op_type} input of rank {rank}: TensorRT's dynamic "
                                         "quantization takes 2-D or 3-D tensors"))
                if node.input[1] not in consts:
                    out.append(Violation("fp4", name, "the double-quantization scale must be a build-time constant"))
                fp4_at = fp4_at or name
            continue
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        is_q = node.op_type == "QuantizeLinear"
        data = node.input[0]
        data_const = data in consts
        scale_name = node.input[1] if len(node.input) > 1 else ""
        fp4_src = _fp4_source(data, consts, producers)
        if not is_q and fp4_src is not None:  # NVFP4 values: a two-level scale, checked on its own
            fp4_at = fp4_at or name
            out += _fp4_violations(name, node, fp4_src, scale_name, consts, producers)
            continue
        if not is_q and _is_fp8_block_scale(node, consts, producers, dq_scales):  # first DQ of an NVFP4 scale
            scale = numpy_helper.to_array(consts[scale_name]) if scale_name in consts else None
            if scale is None or scale.size != 1 or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
                out.append(Violation("fp4", name, "NVFP4 global scale must be a constant positive scalar"))
            continue
        # scale
        if scale_name not in consts:
            out.append(Violation("scale", name, "scale is not a constant"))
            scale = None
        else:
            if consts[scale_name].data_type in _HALF_SCALES:
                half_scale = half_scale or name
            scale = numpy_helper.to_array(consts[scale_name]).astype(np.float64)
            if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
                out.append(Violation("scale", name, f"scale must be finite and > 0 (got {scale.ravel()[:4].tolist()})"))
        block = _attr(node, "block_size", 0)
        per_axis = scale is not None and (scale.size > 1 or bool(block))
        if block:
            uses_int4_or_blocks = True
        if per_axis and not data_const:
            kind = "blocked" if block else "per-channel"
            out.append(Violation("per-channel-on-activation", name,
                                 f"{kind} {node.op_type} on non-constant input '{data}': activations must be "
                                 "per-tensor"))
        if scale is not None and not block and scale.ndim > 1:
            out.append(Violation("scale", name, f"per-axis scale must be 1-D, got shape {list(scale.shape)}"))
        # zero point and quantized type
        zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        qtype = None
        if zp_name:
            if zp_name not in consts:
                out.append(Violation("zero-point", name, "zero point is not a constant"))
            else:
                zp = consts[zp_name]
                qtype = zp.data_type
                if np.any(numpy_helper.to_array(zp) != 0):
                    out.append(Violation("zero-point", name, "zero point is not all zeros (TensorRT is symmetric)"))
        elif is_q:
            qtype = _attr(node, "output_dtype", 0) or TensorProto.UINT8  # ONNX default output is uint8
        if not is_q and data_const:
            qtype = consts[data].data_type
        if qtype in _UNSIGNED:
            out.append(Violation("signed", name, f"{TensorProto.DataType.Name(qtype)} is not supported: use INT8/INT4"))
        if qtype == _FP8:
            fp8_at = fp8_at or name
            if block:
                out.append(Violation("fp8", name, "blocked FP8 (de)quantization: TensorRT's FP8 is per tensor or per "
                                     "channel"))
        elif qtype == _FP4:
            out.append(Violation("fp4", name, "FP4 (de)quantization outside the NVFP4 two-level form"))
        # INT4 rules
        if qtype == TensorProto.INT4:
            uses_int4_or_blocks = True
            if is_q:
                out.append(Violation("int4", name, "QuantizeLinear to INT4: INT4 is weight-only in TensorRT"))
            elif not data_const:
                out.append(Violation("int4", name, f"INT4 DequantizeLinear on non-constant input '{data}'"))
            else:
                dims = list(consts[data].dims)
                if dims and dims[-1] % 2:
                    out.append(Violation("int4", name, f"INT4 weight with odd last dimension {dims[-1]}"))
        if data_const and scale is not None:
            out += _axis_violations(name, node, list(consts[data].dims), consts[data].data_type, scale, block)
    for t in graph.initializer:
        if t.data_type == TensorProto.INT4:
            uses_int4_or_blocks = True
            consumers = [n for n in graph.node if t.name in n.input]
            if any(n.op_type != "DequantizeLinear" for n in consumers):
                out.append(Violation("int4", t.name, "INT4 initializer used by a node other than DequantizeLinear"))
    if uses_int4_or_blocks and opset < 21:
        out.append(Violation("opset", "model", f"INT4 / blocked quantization needs opset >= 21, model has {opset}"))
    if half_scale and opset < 19:
        out.append(Violation("opset", half_scale, f"FP16/BF16 Q/DQ scales need opset >= 19, model has {opset}"))
    if fp8_at and opset < 19:
        out.append(Violation("opset", fp8_at, f"FP8 Q/DQ needs opset >= 19, model has {opset}"))
    if fp4_at and opset < 23:
        out.append(Violation("opset", fp4_at, f"FP4 (FLOAT4E2M1) DequantizeLinear needs opset >= 23, model has "
                             f"{opset}"))
    for t in graph.initializer:
        if t.data_type == _FP4 and any(n.op_type != "DequantizeLinear" for n in graph.node if t.name in n.input):
            out.append(Violation("fp4", t.name, "FP4 initializer used by a node other than DequantizeLinear"))
    return out + _mha_violations(graph, consts) + _weight_only_int8_violations(graph, consts)


def _fp4_source(data: str, consts: dict[str, TensorProto], producers: dict[str, onnx.NodeProto]) -> str | None:
    """``"weight"`` / ``"activation"`` when ``data`` holds FP4 values (an FP4 constant, or the first output of
    ``TRT_FP4DynamicQuantize``), else None."""
    if data in consts:
        return "weight" if consts[data].data_type == _FP4 else None
    p = producers.get(data)
    if p is not None and p.op_type == "TRT_FP4DynamicQuantize" and p.output[0] == data:
        return "activation"
    return None


def _is_fp8_block_scale(node: onnx.NodeProto, consts: dict[str, TensorProto], producers: dict[str, onnx.NodeProto],
                        dq_scales: set[str]) -> bool:
    """True when the DequantizeLinear ``node`` is the first of a two-level NVFP4 scale: it dequantizes FP8 block
    scales (an FP8 constant, or the second output of ``TRT_FP4DynamicQuantize``) into another DQ's scale."""
    if node.output[0] not in dq_scales:
        return False
    data = node.input[0]
    p = producers.get(data)
    if p is not None and p.op_type == "TRT_FP4DynamicQuantize":
        return len(p.output) > 1 and p.output[1] == data
    return data in consts and consts[data].data_type == _FP8


def _fp4_violations(name: str, node: onnx.NodeProto, source: str, scale_name: str, consts: dict[str, TensorProto],
                    producers: dict[str, onnx.NodeProto]) -> list[Violation]:
    """Rules of an NVFP4 ``DequantizeLinear`` (rule ``fp4``)."""
    out = []
    block = _attr(node, "block_size", 0)
    data = node.input[0]
    rank = len(consts[data].dims) if data in consts else None
    if block != NVFP4_BLOCK:
        out.append(Violation("fp4", name, f"NVFP4 block size {block}, expected {NVFP4_BLOCK}"))
    axis = _attr(node, "axis", 1)
    if rank is not None:
        if rank != 2:
            out.append(Violation("fp4", name, f"FP4 weight of rank {rank}: TensorRT blocks 2-D weights"))
        elif axis % rank != rank - 1 or consts[data].dims[-1] % NVFP4_BLOCK:
            out.append(Violation("fp4", name, f"FP4 weight {list(consts[data].dims)} must be blocked along its last "
                                 f"(input) dimension (axis -1), a multiple of {NVFP4_BLOCK}"))
    elif axis != -1:
        out.append(Violation("fp4", name, f"FP4 activation blocked on axis {axis}: TensorRT's dynamic quantization "
                             "blocks the last dimension (axis -1)"))
    sp = producers.get(scale_name)
    if sp is None or sp.op_type != "DequantizeLinear":
        out.append(Violation("fp4", name, "the scale of FP4 values must be DequantizeLinear(FP8 block scales, global "
                             "scale) (two-level NVFP4)"))
        return out
    src = sp.input[0]
    dyn = producers.get(src)
    if source == "activation":
        if dyn is None or dyn.op_type != "TRT_FP4DynamicQuantize" or dyn.output[0] != data:
            out.append(Violation("fp4", name, "FP4 activation scales must come from the same TRT_FP4DynamicQuantize"))
    elif src not in consts or consts[src].data_type != _FP8:
        out.append(Violation("fp4", name, "FP4 weight block scales must be an FP8 (FLOAT8E4M3FN) constant"))
    elif rank == 2:
        want = [consts[data].dims[0], consts[data].dims[1] // NVFP4_BLOCK]
        if list(consts[src].dims) != want:
            out.append(Violation("fp4", name, f"FP8 block scales of shape {list(consts[src].dims)}, expected {want}"))
    return out


#: Ops a tensor passes through unchanged in value between a DequantizeLinear and the MatMul that uses it.
_PASS_THROUGH = frozenset({"Transpose", "Reshape", "Cast", "Identity", "Flatten", "Squeeze", "Unsqueeze"})


def _dequantized_from(name: str, producers: dict[str, onnx.NodeProto]) -> onnx.NodeProto | None:
    """The DequantizeLinear ``name`` comes from through value-preserving ops, or None."""
    node = producers.get(name)
    while node is not None and node.op_type in _PASS_THROUGH:
        node = producers.get(node.input[0])
    return node if node is not None and node.op_type == "DequantizeLinear" else None


def _weight_only_int8_violations(graph: onnx.GraphProto, consts: dict[str, TensorProto]) -> list[Violation]:
    producers = {o: n for n in graph.node for o in n.output}
    out = []
    for i, node in enumerate(graph.node):
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        dqs = [_dequantized_from(x, producers) for x in node.input[:2]]
        int8_weight = [dq is not None and dq.input[0] in consts and consts[dq.input[0]].data_type == TensorProto.INT8
                       for dq in dqs]
        for k in (0, 1):
            if int8_weight[k] and dqs[1 - k] is None:
                out.append(Violation("weight-only-int8", node.name or f"{node.op_type}#{i}",
                                     "INT8 weight with a float activation input: TensorRT documents weight-only "
                                     "quantization for INT4 blocked weights only; quantize the input too, or keep "
                                     "the weight in float"))
    return out


def _axis_violations(name: str, node: onnx.NodeProto, dims: list[int], qtype: int, scale: np.ndarray,
                     block: int) -> list[Violation]:
    """Scale shape rules of a (de)quantized constant: per-axis length, block divisibility, blocked shape."""
    out: list[Violation] = []
    if not dims:
        return out
    axis = _attr(node, "axis", 1) % len(dims)
    if block:
        if qtype != TensorProto.INT4 or len(dims) != 2:
            out.append(Violation("block", name, f"blocked quantization of a {len(dims)}-D "
                                 f"{TensorProto.DataType.Name(qtype)} tensor: TensorRT blocks 2-D INT4 weights only"))
        if dims[axis] % block:
            out.append(Violation("block", name, f"block size {block} does not divide dimension {axis} "
                                 f"({dims[axis]})"))
        want = [d // block if i == axis else d for i, d in enumerate(dims)]
        if scale.ndim != len(dims):
            out.append(Violation("scale", name, f"blocked scale rank {scale.ndim} != input rank {len(dims)}"))
        elif list(scale.shape) != want:
            out.append(Violation("block", name, f"blocked scale shape {list(scale.shape)}, expected {want}"))
    elif scale.size > 1 and scale.ndim == 1 and scale.shape[0] != dims[axis]:
        out.append(Violation("axis", name, f"per-axis scale has {scale.shape[0]} entries, axis {axis} has "
                             f"{dims[axis]}"))
    return out


def _mha_violations(graph: onnx.GraphProto, consts: dict[str, TensorProto]) -> list[Violation]:
    """The fused-attention Q/DQ pattern (rule ``mha``), checked where the attention matmuls are quantized."""
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def is_weight(t: str) -> bool:
        p = producer.get(t)
        return t in consts or (p is not None and p.op_type == "DequantizeLinear" and p.input[0] in consts)

    def dq_source(t: str) -> onnx.NodeProto | None:
        """The node before ``t``'s ``Q -> DQ`` pair, if ``t`` is a dequantized activation."""
        dq = producer.get(t)
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        return producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None

    bmms = [n for n in graph.node if n.op_type == "MatMul" and not any(is_weight(t) for t in n.input)]
    quantized = [n for n in bmms if any(dq_source(t) is not None for t in n.input)]
    if not quantized:
        return []
    out: list[Violation] = []
    for i, n in enumerate(bmms):
        name = n.name or f"MatMul#{i}"
        if n not in quantized:  # a float attention (mixed precision): TensorRT runs it in float, nothing to fuse
            continue
        for k, t in enumerate(n.input):
            if dq_source(t) is None:
                out.append(Violation("mha", name, f"attention matmul input {k} ('{t}') is not a Q -> DQ output: "
                                     "TensorRT's fused INT8 attention needs both inputs quantized"))
        if any((src := dq_source(t)) is not None and src.op_type == "Softmax" for t in n.input):
            users = consumers.get(n.output[0], [])
            if not users or any(u.op_type != "QuantizeLinear" for u in users):
                out.append(Violation("mha", name, "the second attention matmul's output does not feed a "
                                     "QuantizeLinear: TensorRT's fused INT8 attention needs Q/DQ after it"))
    return out


def check_onnx(model: onnx.ModelProto | str | Path) -> list[Violation]:
    """Raise a :class:`DfqError` listing the violations when ``model`` breaks a TensorRT rule.

    Returns:
        The violations of advisory rules (:data:`ADVISORY_RULES`), which do not raise.
    """
    found = lint_onnx(model)
    violations = [v for v in found if v.rule not in ADVISORY_RULES]
    if violations:
        shown = "; ".join(str(v) for v in violations[:5])
        more = f" (+{len(violations) - 5} more)" if len(violations) > 5 else ""
        raise DfqError(f"graph breaks {len(violations)} TensorRT rule(s): {shown}{more}")
    return [v for v in found if v.rule in ADVISORY_RULES]
