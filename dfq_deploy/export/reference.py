"""Running graphs that ONNX Runtime cannot: NVFP4 graphs in ``onnx.reference.ReferenceEvaluator``.

ONNX Runtime 1.32 has no FP4 kernels. ONNX's reference evaluator runs FLOAT4E2M1 ``DequantizeLinear`` (opset 23,
blocked), so the weight path of an NVFP4 graph is evaluated by ONNX's own definition of the op. The activation path
holds TensorRT's ``trt::TRT_FP4DynamicQuantize``, which only TensorRT implements: :class:`TRT_FP4DynamicQuantize` is
dfq-deploy's implementation of TensorRT's documented semantics (TensorRT operator reference, "DynamicQuantize": blocks
of 16 along the last axis, FP4 output, FP8 block scales quantized with the scalar double-quantization scale; the
block scale is ``amax_b / 6`` divided by that scale and cast to FP8, as Model Optimizer's NVFP4 computes it). A graph
run through it checks the export's wiring, not TensorRT: its results are labelled simulated.

It is slow (pure numpy): parity runs it on a few dozen inputs.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

FP4_MAX, FP8_MAX = 6.0, 448.0


class TRT_FP4DynamicQuantize(OpRun):  # noqa: N801 - the evaluator finds an op by its class name
    """``trt::TRT_FP4DynamicQuantize(x, g; axis=-1, block_size=16, scale_type=FLOAT8E4M3FN) -> (x_f4, s_f8)``."""

    op_domain = "trt"

    def _run(self, x: np.ndarray, scale: np.ndarray, axis: int = -1, block_size: int = 16,
             scale_type: int = onnx.TensorProto.FLOAT8E4M3FN) -> tuple[np.ndarray, np.ndarray]:
        if axis not in (-1, x.ndim - 1):
            raise ValueError(f"TRT_FP4DynamicQuantize: only the last axis is implemented here, got {axis}")
        xf = x.astype(np.float32)
        g = np.float32(scale.reshape(()))
        xb = xf.reshape(*xf.shape[:-1], xf.shape[-1] // block_size, block_size)
        amax = np.abs(xb).max(-1, keepdims=True)
        s_f8 = np.clip(amax / FP4_MAX / g, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
        s = s_f8.astype(np.float32) * g
        q = np.where(s > 0, xb / np.where(s > 0, s, 1), 0).clip(-FP4_MAX, FP4_MAX)
        return (q.reshape(xf.shape).astype(ml_dtypes.float4_e2m1fn), s_f8[..., 0])


class ReferenceSession:
    """The part of ``onnxruntime.InferenceSession`` that parity uses (``get_inputs``, ``run``), on the reference
    evaluator with :class:`TRT_FP4DynamicQuantize`."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        self.proto = proto
        self.evaluator = ReferenceEvaluator(proto, new_ops=[TRT_FP4DynamicQuantize])

    def get_inputs(self) -> list[Any]:
        return list(self.proto.graph.input)

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(o, dtype=np.float32) for o in self.evaluator.run(outputs, feeds)]


def has_fp4(proto: onnx.ModelProto) -> bool:
    """True when ``proto`` holds FP4 tensors or TensorRT's dynamic FP4 quantization (ORT cannot run it)."""
    return (any(t.data_type == onnx.TensorProto.FLOAT4E2M1 for t in proto.graph.initializer)
            or any(n.domain == "trt" for n in proto.graph.node))


def has_trt_ops(proto: onnx.ModelProto) -> bool:
    """True when ``proto`` holds TensorRT-domain ops (their evaluation here is simulated)."""
    return any(n.domain == "trt" for n in proto.graph.node)
