"""PyTorch fake-quant model -> TensorRT-style QDQ ONNX (opset 21; 23 for NVFP4).

Stages, top to bottom:
  1. export the model in float (quantizers off, fused attention off) with the dynamo exporter, batch dynamic;
  2. clean the float graph with onnx-graphsurgeon (fold constants, cleanup, toposort);
  3. find each quantized Linear's MatMul by the value of its weight initializer (dynamo stores ``W^T``
     ``[K, N]`` for MatMul), and the attention matmuls (MatMuls with two activation inputs) in forward order;
  4. replace each weight by INT8 / INT4 integers behind a ``DequantizeLinear`` (per output channel on axis 1,
     or blocked along K with ``block_size``), and put ``QuantizeLinear -> DequantizeLinear`` (INT8, zero
     point 0, per-tensor) on the activation inputs that the PyTorch model quantizes; where the attention
     matmuls are quantized, the P·V matmul's output gets a Q/DQ pair too, with the scale of the ``proj`` input
     quantizer (:func:`pv_output_quantizer`): TensorRT's fused INT8 attention needs Q/DQ before the first
     batched matmul, after the softmax and after the second batched matmul (TensorRT developer guide, quoted in
     NVIDIA/TensorRT issues 2981 and 4167). The values do not change: the Transpose/Reshape between the two
     pairs move values without changing them, and quantizing twice on one grid is quantizing once;
     FP8 (``fmt`` ``fp8``): the same places and layouts with FLOAT8E4M3FN weights and zero points (TensorRT: FP8
     Q/DQ per-tensor on activations, per-channel on weights; Model Optimizer exports FP8 the same way, with the
     softmax output's scale fixed to 1 / 448). NVFP4 (``nvfp4``, :meth:`_QDQBuilder.weight_nvfp4` /
     :meth:`_QDQBuilder.act_nvfp4`): Model Optimizer's two-level form, opset 23 (FLOAT4E2M1 is ONNX 1.18 / opset 23);
  5. convert the graph's compute type to FP16 (:mod:`dfq_deploy.export.fp16`; the default, for TensorRT) or keep
     FP32 (for CPU runtimes);
  6. store the model's timm data config in the metadata (:data:`DATA_CONFIG_KEY`), so ``dfq-deploy eval --onnx``
     and apps preprocess like the model, and its class names where it has them (:data:`CLASS_NAMES_KEY`);
  7. check with ``onnx.checker`` (full check) and the TensorRT-rules linter.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import warnings
from collections import defaultdict
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from dfq_deploy.device import model_device
from dfq_deploy.errors import DfqError
from dfq_deploy.quant.qmodel import QuantLinear, attention_modules, quant_disabled, quant_linears
from dfq_deploy.quant.quantizers import ActQuantizer
from dfq_deploy.utils import atomic_write_bytes

logger = logging.getLogger(__name__)

OPSET = 21
#: Opset of graphs holding FLOAT4E2M1 tensors: ``DequantizeLinear`` accepts FLOAT4E2M1 from opset 23 (ONNX 1.18).
FP4_OPSET = 23
#: Domain and op of TensorRT's dynamic FP4 block quantization, as Model Optimizer exports NVFP4 activations
#: (``modelopt/torch/quantization/export_onnx.py``, ``_fp4_dynamic_quantize``: ``trt::TRT_FP4DynamicQuantize``
#: with attributes ``axis``, ``block_size``, ``scale_type``, inputs ``(x, FP32 global scale)``, outputs ``(FP4 values,
#: FP8 block scales)``; it is a TensorRT plugin-free local function the ONNX parser maps to ``IDynamicQuantizeLayer``).
TRT_DOMAIN = "trt"
TRT_FP4_DYNAMIC_QUANTIZE = "TRT_FP4DynamicQuantize"
#: Element type of each float format's quantized values.
FP8_TYPE = TensorProto.FLOAT8E4M3FN
FP4_TYPE = TensorProto.FLOAT4E2M1
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
#: ONNX metadata key holding the timm data config (input size, mean, std, ...).
DATA_CONFIG_KEY = "dfq_deploy.data_config"
#: ONNX metadata key of an FP16 graph's FP32 islands (JSON: node name -> reason; null when no images were checked).
FP32_NODES_KEY = "dfq_deploy.fp32_nodes"
#: ONNX metadata key holding the model's class names in label order (JSON list), when the model has them.
CLASS_NAMES_KEY = "dfq_deploy.class_names"
#: Part of the name of every node and initializer of an NVFP4 quantizer (:func:`nvfp4_nodes`).
NVFP4_NODE_TAG = "_nvfp4"


def export_float_onnx(model: nn.Module, input_size: tuple[int, int, int]) -> onnx.ModelProto:
    """Export ``model`` with every quantizer off: the float graph the Q/DQ nodes are added to.

    Args:
        model: a timm model (fused attention must be off; :func:`dfq_deploy.models.create_model` does that).
        input_size: ``(C, H, W)``.
    """
    import onnx_graphsurgeon as gs

    example = torch.randn(2, *input_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with quant_disabled(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        was_training = model.training
        model.eval()
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
        model.train(was_training)
    proto = program.model_proto
    graph = gs.import_onnx(proto)
    graph.fold_constants().cleanup().toposort()
    proto = gs.export_onnx(graph)
    proto.ir_version = min(proto.ir_version, 10)
    for vi in list(proto.graph.input) + list(proto.graph.output):  # drop exporter bookkeeping
        del vi.metadata_props[:]
    return proto


def _key(arr: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(arr, dtype=np.float32).tobytes()).hexdigest() + str(arr.shape)


class _QDQBuilder:
    """Adds Q/DQ nodes and initializers to a graph with unique names."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.new_nodes: dict[str, list[onnx.NodeProto]] = defaultdict(list)  # before-node name -> nodes
        self.after: dict[str, list[onnx.NodeProto]] = defaultdict(list)  # after-node name -> nodes
        self.counter = 0

    def name(self, base: str) -> str:
        self.counter += 1
        return f"{base}_{self.counter}"

    def add_init(self, tensor: TensorProto) -> str:
        self.graph.initializer.append(tensor)
        return tensor.name

    def _qdq(self, src: str, dst: str, scale: float, tag: str, fmt: str = "int") -> list[onnx.NodeProto]:
        """``src -> Q -> DQ -> dst`` (INT8, or FP8 E4M3 for ``fmt`` ``fp8``; zero point 0, per-tensor).

        FP8: the zero point's type (FLOAT8E4M3FN) sets the quantized type, saturate is ONNX's default (1), which is
        TensorRT's ``clip(x / s, -448, 448)`` ("Quantization Schemes") and what Model Optimizer's FP8 export writes.
        """
        s = self.add_init(numpy_helper.from_array(np.array(scale, dtype=np.float32), self.name(f"{tag}_scale")))
        ztype = FP8_TYPE if fmt == "fp8" else TensorProto.INT8
        zp = self.add_init(helper.make_tensor(self.name(f"{tag}_zp"), ztype, [], [0]))
        q_out = self.name(f"{tag}_q")
        return [helper.make_node("QuantizeLinear", [src, s, zp], [q_out], name=q_out),
                helper.make_node("DequantizeLinear", [q_out, s, zp], [dst], name=self.name(f"{tag}_dq"))]

    def act_qdq(self, node: onnx.NodeProto, index: int, scale: float, tag: str, fmt: str = "int") -> None:
        """Insert ``Q -> DQ`` on input ``index`` of ``node``."""
        dq_out = self.name(f"{tag}_dq_out")
        self.new_nodes[node.name] += self._qdq(node.input[index], dq_out, scale, tag, fmt)
        node.input[index] = dq_out

    def output_qdq(self, node: onnx.NodeProto, scale: float, tag: str, fmt: str = "int") -> None:
        """Insert ``Q -> DQ`` on the output of ``node`` (its consumers read the DQ's output, same name)."""
        raw = self.name(f"{tag}_raw")
        self.after[node.name] += self._qdq(raw, node.output[0], scale, tag, fmt)
        node.output[0] = raw

    def act_nvfp4(self, node: onnx.NodeProto, index: int, global_scale: float, tag: str, rank: int | None = None,
                  width: int | None = None) -> None:
        """NVFP4 activation on input ``index`` of ``node``, as Model Optimizer exports it (``export_fp4``, dynamic):
        ``x -> trt::TRT_FP4DynamicQuantize(x, g; axis=-1, block_size=16, scale_type=FLOAT8E4M3FN) -> (x_f4, s_f8)``,
        ``DequantizeLinear(s_f8, g) -> s``, ``DequantizeLinear(x_f4, s; axis=-1, block_size=16) -> x'``. The global
        scale ``g`` is an FP32 constant (modelopt: ``torch_dtype_map["Float"]``); the FP16 conversion keeps these
        nodes FP32 (:data:`NVFP4_NODE_TAG`), with a Cast to FP16 before the MatMul as modelopt's graph has.

        TensorRT's dynamic quantization takes 2-D or 3-D inputs (operator reference, "DynamicQuantize"): an input
        of ``rank`` > 3 (Swin's patch merging, ``[B, H, W, 4C]``) is reshaped to ``[-1, width]`` around it (the
        blocked last axis keeps its values) and back to its own shape after the second DQ."""
        from dfq_deploy.quant.quantizers import NVFP4_BLOCK

        src = node.input[index]
        pre: list[onnx.NodeProto] = []
        if rank is not None and rank > 3 and width:
            shape2d = self.add_init(numpy_helper.from_array(np.array([-1, width], dtype=np.int64),
                                                            self.name(f"{tag}{NVFP4_NODE_TAG}_2d")))
            flat, orig = self.name(f"{tag}_flat"), self.name(f"{tag}_shape")
            pre = [helper.make_node("Shape", [src], [orig], name=orig),
                   helper.make_node("Reshape", [src, shape2d], [flat], name=flat)]
            src = flat
        g = self.add_init(numpy_helper.from_array(np.array(global_scale, dtype=np.float32),
                                                  self.name(f"{tag}{NVFP4_NODE_TAG}_gscale")))
        x_f4, s_f8 = self.name(f"{tag}{NVFP4_NODE_TAG}_x_f4"), self.name(f"{tag}{NVFP4_NODE_TAG}_s_f8")
        s, out = self.name(f"{tag}{NVFP4_NODE_TAG}_s"), self.name(f"{tag}{NVFP4_NODE_TAG}_dq_out")
        self.new_nodes[node.name] += [
            *pre,
            helper.make_node(TRT_FP4_DYNAMIC_QUANTIZE, [src, g], [x_f4, s_f8], name=x_f4,
                             domain=TRT_DOMAIN, axis=-1, block_size=NVFP4_BLOCK, scale_type=FP8_TYPE),
            helper.make_node("DequantizeLinear", [s_f8, g], [s], name=s),
            helper.make_node("DequantizeLinear", [x_f4, s], [out], name=out, axis=-1, block_size=NVFP4_BLOCK),
        ]
        if pre:
            back = self.name(f"{tag}_unflat")
            self.new_nodes[node.name].append(helper.make_node("Reshape", [out, pre[0].output[0]], [back],
                                                              name=back))
            out = back
        node.input[index] = out

    def weight_nvfp4(self, node: onnx.NodeProto, index: int, lin: QuantLinear, transposed: bool, tag: str) -> None:
        """NVFP4 weight on input ``index``, as Model Optimizer's ONNX exporter writes it
        (``modelopt/onnx/export/nvfp4_exporter.py``, ``_replace_fp4qdq_with_2dq``): FP4 E2M1 values ``[out, in]``
        (FLOAT4E2M1 initializer), FP8 E4M3 block scales ``[out, in / 16]`` (FLOAT8E4M3FN initializer) and an FP32
        scalar global scale; ``DequantizeLinear(s_f8, g) -> s``, ``DequantizeLinear(w_f4, s; axis=-1,
        block_size=16) -> w``, then a ``Transpose`` where the MatMul reads ``[in, out]`` (modelopt's graph has the
        same Transpose between the second DQ and the MatMul)."""
        wq = lin.weight_quantizer
        assert wq is not None
        w = lin.weight.detach().float()
        vals = wq.integers(w).numpy()  # [out, in] E2M1 values
        f4 = self.add_init(numpy_helper.from_array(vals.astype(ml_dtypes.float4_e2m1fn),
                                                   self.name(f"{tag}{NVFP4_NODE_TAG}_w_f4")))
        sf8 = self.add_init(numpy_helper.from_array(
            wq.block_scales_fp8().detach().float().numpy().astype(ml_dtypes.float8_e4m3fn),
            self.name(f"{tag}{NVFP4_NODE_TAG}_w_s_f8")))
        g = self.add_init(numpy_helper.from_array(np.array(float(wq.global_scale), dtype=np.float32),
                                                  self.name(f"{tag}{NVFP4_NODE_TAG}_w_gscale")))
        s, out = self.name(f"{tag}{NVFP4_NODE_TAG}_w_s"), self.name(f"{tag}{NVFP4_NODE_TAG}_w_dq")
        nodes = [helper.make_node("DequantizeLinear", [sf8, g], [s], name=s),
                 helper.make_node("DequantizeLinear", [f4, s], [out], name=out, axis=-1, block_size=wq.block_size)]
        if transposed:
            t = self.name(f"{tag}_w_t")
            nodes.append(helper.make_node("Transpose", [out], [t], name=t, perm=[1, 0]))
            out = t
        self.new_nodes[node.name] += nodes
        node.input[index] = out

    def weight_dq(self, node: onnx.NodeProto, index: int, lin: QuantLinear, transposed: bool, tag: str) -> None:
        """Replace the float weight on input ``index`` by integers behind a ``DequantizeLinear``."""
        wq = lin.weight_quantizer
        assert wq is not None
        if wq.fmt == "nvfp4":
            return self.weight_nvfp4(node, index, lin, transposed, tag)
        w = lin.weight.detach().float()
        fp8 = wq.fmt == "fp8"
        ints = wq.integers(w).numpy() if fp8 else wq.integers(w).to(torch.int64).numpy()  # [out, in]
        scale = wq.scale.detach().float().numpy()  # [out] or [out, nblocks]
        storage = 8 if wq.bits > 4 else 4
        attrs: dict[str, int] = {}
        if transposed:  # MatMul layout [K, N]: channels on axis 1, blocks along axis 0
            ints = ints.T
            if wq.block_size is None:
                attrs["axis"] = 1
            else:
                scale = scale.T  # [nblocks, out]
                attrs.update(axis=0, block_size=wq.block_size)
        else:  # Gemm(transB=1) layout [N, K]
            attrs["axis"] = 0
            if wq.block_size is not None:
                attrs.update(axis=1, block_size=wq.block_size)
        np_dtype = ml_dtypes.float8_e4m3fn if fp8 else np.int8 if storage == 8 else ml_dtypes.int4
        kind = "fp8" if fp8 else f"int{storage}"
        qname = self.add_init(numpy_helper.from_array(np.ascontiguousarray(ints).astype(np_dtype),
                                                      self.name(f"{tag}_w_{kind}")))
        sname = self.add_init(numpy_helper.from_array(np.ascontiguousarray(scale, dtype=np.float32),
                                                      self.name(f"{tag}_w_scale")))
        out = self.name(f"{tag}_w_dq")
        self.new_nodes[node.name].append(helper.make_node("DequantizeLinear", [qname, sname], [out], name=out,
                                                          **attrs))
        node.input[index] = out

    def finish(self) -> None:
        nodes = list(self.graph.node)
        del self.graph.node[:]
        for n in nodes:
            self.graph.node.extend(self.new_nodes.get(n.name, []))
            self.graph.node.append(n)
            self.graph.node.extend(self.after.get(n.name, []))
        used = {i for n in self.graph.node for i in n.input}
        keep = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)


def insert_qdq(proto: onnx.ModelProto, model: nn.Module) -> onnx.ModelProto:
    """Add the Q/DQ nodes that reproduce ``model``'s fake quantizers to its float graph ``proto`` (in place).

    Raises:
        DfqError: a quantized layer or attention matmul could not be found in the graph.
    """
    graph = proto.graph
    _name_nodes(proto)
    b = _QDQBuilder(proto)
    act_mm = [n for n in graph.node if n.op_type == "MatMul" and not any(i in b.inits for i in n.input)]
    # 1. weights: match by value (MatMul holds W^T, Gemm with transB=1 holds W).
    by_key: dict[str, list[tuple[onnx.NodeProto, int, bool]]] = defaultdict(list)
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        for idx in (1, 0):
            if idx < len(node.input) and node.input[idx] in b.inits:
                arr = numpy_helper.to_array(b.inits[node.input[idx]])
                if arr.ndim == 2:
                    transposed = node.op_type == "MatMul" or not any(
                        a.name == "transB" and a.i == 1 for a in node.attribute)
                    by_key[_key(arr)].append((node, idx, transposed))
                break
    ranks: dict[str, int] = {}  # tensor ranks of the float graph (NVFP4 activations of rank > 3 are reshaped)
    if any(getattr(lin.input_quantizer, "fmt", "") == "nvfp4" for _, lin in quant_linears(model)):
        inferred = onnx.shape_inference.infer_shapes(proto).graph
        ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*inferred.value_info, *inferred.input]
                 if v.type.tensor_type.HasField("shape")}
    for lname, lin in quant_linears(model):
        w = lin.weight.detach().float().numpy()
        hits = by_key.get(_key(w.T)) or by_key.get(_key(w))
        if not hits:
            raise DfqError(f"export: could not find the MatMul of {lname} in the ONNX graph")
        node, idx, transposed = hits.pop(0)
        tag = lname.replace(".", "_")
        if lin.weight_quantizer is not None and lin.weight_quantizer.enabled:
            b.weight_dq(node, idx, lin, transposed, tag)
        iq = lin.input_quantizer
        if iq is not None and iq.enabled:
            at = 1 - idx if node.op_type == "MatMul" else 0
            if iq.fmt == "nvfp4":
                b.act_nvfp4(node, at, _global_scale(iq, lname), f"{tag}_in", ranks.get(node.input[at]),
                            lin.in_features)
            else:
                b.act_qdq(node, at, _scalar(iq, lname), f"{tag}_in", iq.fmt)
    # 2. attention matmuls: MatMuls whose inputs are both activations, two per attention module, in order.
    # Every attention module has its two matmuls in the graph; only some may be quantized (mixed precision).
    attns = attention_modules(model)
    if any(hasattr(a, "q_quant") for a in attns):
        if len(act_mm) != 2 * len(attns):
            raise DfqError(f"export: found {len(act_mm)} attention matmuls, expected {2 * len(attns)}")
        for a_i, attn in enumerate(attns):
            if not hasattr(attn, "q_quant"):
                continue
            qk, pv = act_mm[2 * a_i], act_mm[2 * a_i + 1]
            for node, idx, q, t in ((qk, 0, attn.q_quant, "q"), (qk, 1, attn.k_quant, "k"),
                                    (pv, 0, attn.p_quant, "p"), (pv, 1, attn.v_quant, "v")):
                if q.enabled:
                    b.act_qdq(node, idx, _scalar(q, f"attn{a_i}.{t}"), f"attn{a_i}_{t}", q.fmt)
            out_q = pv_output_quantizer(attn)
            if out_q is not None:
                b.output_qdq(pv, _scalar(out_q, f"attn{a_i}.pv_out"), f"attn{a_i}_pv_out", out_q.fmt)
    b.finish()
    if any(t.data_type == FP4_TYPE for t in graph.initializer) or any(n.domain == TRT_DOMAIN for n in graph.node):
        _set_fp4_opsets(proto)
    return proto


def _set_fp4_opsets(proto: onnx.ModelProto) -> None:
    """Opset 23 (FLOAT4E2M1 ``DequantizeLinear``) and the ``trt`` domain, for NVFP4 graphs. The float graph's ops
    (opset 21) mean the same at 23 (ONNX's changelog: opsets 22 and 23 add types, e.g. FP4, to existing ops)."""
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = max(o.version, FP4_OPSET)
    if any(n.domain == TRT_DOMAIN for n in proto.graph.node) and not any(
            o.domain == TRT_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(TRT_DOMAIN, 1))
    proto.ir_version = max(proto.ir_version, 11)  # FLOAT4E2M1 is IR version 11


def nvfp4_nodes(proto: onnx.ModelProto) -> list[str]:
    """Names of the NVFP4 nodes of a graph (they stay FP32 in an FP16 graph, as in Model Optimizer's)."""
    return [n.name for n in proto.graph.node if NVFP4_NODE_TAG in n.name]


def _name_nodes(proto: onnx.ModelProto) -> None:
    for i, node in enumerate(proto.graph.node):
        if not node.name:
            node.name = f"node_{i}"


def pv_output_quantizer(attn: nn.Module) -> ActQuantizer | None:
    """The quantizer whose Q/DQ pair the export puts on ``attn``'s P·V matmul output, or None.

    It is the ``proj`` input quantizer, when the attention matmuls are quantized (fused INT8 attention),
    ``proj``'s input is too, and only a transpose/reshape lies between the two (timm's optional post-attention
    ``norm`` and ``gate`` would change the values: then there is no pair, and the linter's advisory ``mha`` rule
    says so); the graph then holds that quantizer's pair twice.
    """
    proj = getattr(attn, "proj", None)
    iq = getattr(proj, "input_quantizer", None)
    attn_q = [getattr(attn, k, None) for k in ("p_quant", "v_quant")]
    if iq is None or not iq.enabled or not all(q is not None and q.enabled for q in attn_q):
        return None
    if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity) or getattr(attn, "gate", None) is not None:
        return None
    return iq


def _global_scale(q: ActQuantizer, name: str) -> float:
    if not q.calibrated:
        raise DfqError(f"{name}: activation quantizer is not calibrated")
    return float(q.scale)


def _scalar(q: ActQuantizer, name: str) -> float:
    if q.log2:
        raise DfqError(f"{name}: the log2 attention quantizer has no ONNX/TensorRT kernel (simulation only)")
    if getattr(q, "asymmetric", False):
        raise DfqError(f"{name}: asymmetric activations (a zero point) are not deployable; TensorRT needs zero point "
                       "0: use a symmetric preset")
    if q.bits != 8 or q.fmt not in ("int", "fp8"):
        raise DfqError(f"{name}: {q.bits}-bit {q.fmt} activations have no per-tensor Q/DQ; TensorRT runs INT8 and FP8 "
                       "ones (NVFP4 only on Linear inputs)")
    if not q.calibrated:
        raise DfqError(f"{name}: activation quantizer is not calibrated")
    return float(q.scale)


def to_onnx(model: nn.Module, input_size: tuple[int, int, int] | None = None,
            data_cfg: dict | None = None, dtype: str = "fp16", calib: torch.Tensor | None = None) -> onnx.ModelProto:
    """The deployable QDQ ONNX of a (fake-)quantized model, checked by ``onnx.checker`` and the linter.

    Args:
        model: the (fake-)quantized timm model.
        input_size: ``(C, H, W)``; default: the data config's.
        data_cfg: the timm data config stored in the graph's metadata; default:
            :func:`dfq_deploy.models.data_config` of ``model``.
        dtype: the graph's compute type, ``"fp16"`` (what TensorRT should build) or ``"fp32"``; input and
            output are FP32 either way.
        calib: images (model space) whose magnitudes choose the FP16 graph's FP32 islands
            (:func:`~dfq_deploy.export.islands.fp32_islands`, listed in the metadata under
            :data:`FP32_NODES_KEY`); None: every node FP16, with a warning that nothing was checked.
    """
    from dfq_deploy.config import GRAPH_DTYPES
    from dfq_deploy.export.fp16 import to_fp16
    from dfq_deploy.export.lint import check_onnx
    from dfq_deploy.models import class_names, data_config

    if dtype not in GRAPH_DTYPES:
        raise DfqError(f"graph dtype '{dtype}' is unknown: use one of {', '.join(GRAPH_DTYPES)}")
    data_cfg = dict(data_config(model) if data_cfg is None else data_cfg)
    if model_device(model).type != "cpu":  # the exporter traces on the CPU; a copy leaves the model where it is
        model = copy.deepcopy(model).cpu()
    proto = export_float_onnx(model, tuple(input_size or data_cfg["input_size"]))
    _name_nodes(proto)
    # ONNX Runtime has no FP4 kernels: an NVFP4 graph's FP32 islands are chosen on its float graph (same node names)
    fp4 = any(getattr(q, "fmt", "int") == "nvfp4" for m in model.modules() if isinstance(m, QuantLinear)
              for q in (m.weight_quantizer, m.input_quantizer))
    island_graph = copy.deepcopy(proto) if fp4 else proto
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        insert_qdq(proto, model)
    if dtype == "fp16":
        islands: dict[str, str] = {}
        if calib is not None:
            from dfq_deploy.export.islands import fp32_islands

            islands = fp32_islands(island_graph, calib)
        else:
            logger.warning("FP16 graph without calibration images: no node was checked for values beyond FP16 "
                           "(pass calib= to keep such nodes in FP32)")
        proto = to_fp16(proto, keep_fp32={**islands, **dict.fromkeys(nvfp4_nodes(proto), "nvfp4")})
        meta = proto.metadata_props.add()
        meta.key, meta.value = FP32_NODES_KEY, json.dumps(islands if calib is not None else None)
    meta = proto.metadata_props.add()
    meta.key, meta.value = DATA_CONFIG_KEY, json.dumps(data_cfg)
    names = class_names(model)
    if names is not None:
        meta = proto.metadata_props.add()
        meta.key, meta.value = CLASS_NAMES_KEY, json.dumps(names)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise DfqError(f"exported graph failed onnx.checker: {str(exc).splitlines()[0]}") from exc
    for v in check_onnx(proto):
        logger.warning("TensorRT advisory: %s", v)
    return proto


def save_onnx(proto: onnx.ModelProto, path: str | Path) -> Path:
    """Write ``proto`` atomically (temp file, then rename)."""
    path = Path(path)
    atomic_write_bytes(path, proto.SerializeToString())
    logger.info("wrote %s (%.2f MB)", path, path.stat().st_size / 1e6)
    return path


def fp32_nodes(proto: onnx.ModelProto) -> dict[str, str] | None:
    """The FP32 islands recorded in an FP16 graph (node name -> reason), or None (FP32 graph, or not checked)."""
    value = next((p.value for p in proto.metadata_props if p.key == FP32_NODES_KEY), None)
    return None if value is None else json.loads(value)
