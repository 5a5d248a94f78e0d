"""FP32 islands of an FP16 graph: the nodes whose values are too large for FP16, chosen from calibration images.

TensorRT builds an FP16-typed Q/DQ graph strongly typed: every layer computes in the type the graph gives it, and
a normalization computes in its input type (NvInfer.h 10.3: a strongly typed network rejects
``setComputePrecision``; onnx-tensorrt's importer skips it there). A LayerNorm, a residual ``Add`` or a softmax
input whose values approach FP16's range (65504) then overflows on the GPU although the FP32 model was fine.
NVIDIA's AutoCast (Model Optimizer ``modelopt.onnx.autocast``, TensorRT's ``samples/python/strongly_type_autocast``)
keeps nodes whose inputs or outputs exceed ``data_max`` (512 by default) in FP32; this module applies the same
rule with the magnitudes measured on the calibration images: :func:`fp32_islands` runs the FP32 graph in ONNX
Runtime with every intermediate tensor exposed, and names each node whose largest input or output magnitude
exceeds :data:`FP32_ABOVE`. :func:`~dfq_deploy.export.fp16.to_fp16` then keeps those nodes in FP32 with a
``Cast`` on each side, so ONNX Runtime, and the parity check, compute what TensorRT will compute.

The margin: 512 is FP16's largest value divided by 128, so a node kept in FP16 has 7 binades of headroom over
the largest value the calibration images produced in it.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import torch

logger = logging.getLogger(__name__)

#: A node whose inputs or outputs exceed this magnitude on the calibration images stays FP32 (AutoCast's default
#: ``data_max``).
FP32_ABOVE = 512.0
#: Nodes that are never islands: quantization keeps its own types (an FP16 scale types the DQ output), and these
#: move or reshape values without arithmetic.
_NEVER = frozenset({"QuantizeLinear", "DequantizeLinear", "Shape", "Reshape", "Transpose", "Concat", "Gather",
                    "Slice", "Squeeze", "Unsqueeze", "Flatten", "Cast", "Identity", "Constant", "Expand", "Split"})
#: Images the magnitudes are measured on (the largest values, not their statistics, matter).
MAX_IMAGES = 64
#: Images a run: each returns every intermediate tensor (ViT-B at 224 px: about 0.6 GB an image).
BATCH = 4


def tensor_magnitudes(proto: onnx.ModelProto, images: torch.Tensor) -> dict[str, float]:
    """Largest ``|value|`` of every float tensor of the FP32 graph ``proto`` over ``images`` (ONNX Runtime, CPU)."""
    from dfq_deploy.export.ort import ort_session

    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    inferred = onnx.shape_inference.infer_shapes(exposed)
    floats = {v.name for v in inferred.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    have = {o.name for o in exposed.graph.output}
    for name in sorted(floats - have):
        exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort_session(exposed, optimize=False)
    names = [o.name for o in session.get_outputs()]
    inp = session.get_inputs()[0].name
    peak = dict.fromkeys(names, 0.0)
    x = images[:MAX_IMAGES].numpy().astype(np.float32)
    for i in range(0, len(x), BATCH):  # every intermediate tensor comes back: small batches bound the memory
        for name, value in zip(names, session.run(None, {inp: x[i : i + BATCH]}), strict=True):
            if np.issubdtype(value.dtype, np.floating) and value.size:
                peak[name] = max(peak[name], float(np.abs(value).max()))
    for t in proto.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT:
            arr = onnx.numpy_helper.to_array(t)
            peak[t.name] = float(np.abs(arr).max()) if arr.size else 0.0
    return peak


def fp32_islands(proto: onnx.ModelProto, images: torch.Tensor, limit: float = FP32_ABOVE) -> dict[str, str]:
    """The nodes of the FP32 graph ``proto`` to keep in FP32, each with its reason (empty: all FP16).

    Args:
        proto: the FP32 export (before FP16 conversion); every node needs a name.
        images: calibration images in model space.
        limit: the magnitude above which a node stays FP32.
    """
    peak = tensor_magnitudes(proto, images)
    islands: dict[str, str] = {}
    for node in proto.graph.node:
        if node.op_type in _NEVER or not node.name:
            continue
        seen = [(peak[t], t) for t in [*node.input, *node.output] if t in peak]
        if not seen:
            continue
        top, where = max(seen)
        if top > limit:
            islands[node.name] = f"{node.op_type}: |{where}| reaches {top:.4g} > {limit:g} on the calibration images"
    if islands:
        logger.info("FP16 graph: %d node(s) stay FP32 (values above %g): %s", len(islands), limit,
                    ", ".join(list(islands)[:6]) + (", ..." if len(islands) > 6 else ""))
    return islands
