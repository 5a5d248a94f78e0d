"""ONNX graphs for the TensorRT tests (hand-built and exported), and the GPU skip reason.

:func:`make_model` builds tiny graphs by hand with ``onnx.helper``: ``input [N, 3, 4, 4] -> Flatten -> MatMul ->
logits [N, 10]``, as float, INT8 Q/DQ (per-tensor activation, per-channel weight) or INT4 weight-only (blocked
``DequantizeLinear``, opset 21), FP32-typed or FP16-typed. FP16 graphs come from the exporter's own converter
(:func:`dfq_deploy.export.fp16.to_fp16`), so, like ``dfq-deploy export``, they keep a float32 input and output
with one ``Cast`` each. :func:`vit_graph` exports a real tiny DeiT (DeiT-Tiny widths: head dim 64, 65 tokens) with
:func:`dfq_deploy.export.onnx.to_onnx`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dfq_deploy.export.fp16 import to_fp16
from dfq_deploy.trt.env import gpu_available

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
CHW = (3, 4, 4)
NUM_CLASSES = 10


def _gpu_skip_reason() -> str:
    reasons = []
    if not HAS_TRT:
        reasons.append("tensorrt is not installed")
    ok, why = gpu_available()
    if not ok:
        reasons.append(f"no usable NVIDIA GPU ({why})")
    return "needs TensorRT and an NVIDIA GPU: " + "; ".join(reasons) if reasons else ""


GPU_SKIP = _gpu_skip_reason()
requires_gpu = pytest.mark.skipif(bool(GPU_SKIP), reason=GPU_SKIP or "TensorRT and GPU available")


# --- tiny hand-built graphs -------------------------------------------------------------------------------
def make_model(kind: str = "fp32", batch: str | int = "batch", chw: tuple[int, int, int] = CHW,
               opset: int = 21, seed: int = 0, bad_zero_point: bool = False, dtype: str | None = None
               ) -> onnx.ModelProto:
    """``input -> Flatten -> MatMul(W) -> logits``.

    Args:
        kind: ``fp32`` / ``fp16`` (float graphs of that type), ``int8`` (Q/DQ) or ``int4`` (weight-only).
        dtype: compute type of an ``int8`` / ``int4`` graph, ``"fp32"`` (default) or ``"fp16"``.
    """
    dtype = dtype or ("fp16" if kind == "fp16" else "fp32")
    rng = np.random.default_rng(seed)
    k = int(np.prod(chw))
    w = rng.normal(0, 0.2, (k, NUM_CLASSES)).astype(np.float32)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, *chw])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, NUM_CLASSES])
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], name="flatten", axis=1)]
    inits: list[onnx.TensorProto] = []
    act, weight = "flat", "W"
    if kind in ("fp32", "fp16"):
        inits.append(numpy_helper.from_array(w, "W"))
    elif kind == "int8":
        zp_type = TensorProto.UINT8 if bad_zero_point else TensorProto.INT8
        inits += [numpy_helper.from_array(np.array(0.05, np.float32), "a_scale"),
                  helper.make_tensor("a_zp", zp_type, [], [0])]
        nodes += [helper.make_node("QuantizeLinear", ["flat", "a_scale", "a_zp"], ["flat_q"], name="a_q"),
                  helper.make_node("DequantizeLinear", ["flat_q", "a_scale", "a_zp"], ["flat_dq"], name="a_dq")]
        w_scale = np.abs(w).max(0) / 127
        w_int = np.clip(np.round(w / w_scale), -127, 127).astype(np.int64)
        inits += [helper.make_tensor("W_int8", TensorProto.INT8, list(w_int.shape), w_int.flatten().tolist()),
                  numpy_helper.from_array(w_scale.astype(np.float32), "W_scale")]
        nodes.append(helper.make_node("DequantizeLinear", ["W_int8", "W_scale"], ["W_dq"], name="w_dq", axis=1))
        act, weight = "flat_dq", "W_dq"
    elif kind == "int4":
        block = 16
        w_scale = np.abs(w.reshape(k // block, block, NUM_CLASSES)).max(1) / 7  # [K/block, N]
        w_int = np.clip(np.round(w / np.repeat(w_scale, block, axis=0)), -8, 7).astype(np.int64)
        inits += [helper.make_tensor("W_int4", TensorProto.INT4, list(w_int.shape), w_int.flatten().tolist()),
                  numpy_helper.from_array(w_scale.astype(np.float32), "W_scale")]
        nodes.append(helper.make_node("DequantizeLinear", ["W_int4", "W_scale"], ["W_dq"], name="w_dq", axis=0,
                                      block_size=block))
        weight = "W_dq"
    else:
        raise ValueError(kind)
    nodes.append(helper.make_node("MatMul", [act, weight], ["logits"], name="matmul"))
    graph = helper.make_graph(nodes, f"tiny_{kind}", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10  # onnxruntime refuses onnx 1.23's default IR version
    return to_fp16(model) if dtype == "fp16" else model


def vit_graph(preset: str | None = "W8A8", dtype: str = "fp16", seed: int = 0) -> onnx.ModelProto:
    """A tiny random-weight DeiT (``TINY_CONFIGS["deit"]``: 32x32, patch 4, depth 2) exported by ``to_onnx``.

    Args:
        preset: a :data:`dfq_deploy.config.PRESETS` name (``W8A8``, ``W4A16``, ...) or None for the float graph.
        dtype: the graph's compute type, ``"fp16"`` (the export default) or ``"fp32"``.
    """
    import torch

    from dfq_deploy.config import PRESETS
    from dfq_deploy.export.onnx import to_onnx
    from dfq_deploy.models import TINY_CONFIGS, ModelSpec, create_model
    from dfq_deploy.quant.qmodel import batches_loop, quantize

    name, kwargs = TINY_CONFIGS["deit"]
    torch.manual_seed(seed)
    model = create_model(ModelSpec(name, kwargs=dict(kwargs), random_weights=True))
    if preset is not None:
        quantize(model, PRESETS[preset], batches_loop(torch.randn(24, 3, 32, 32)))
    return to_onnx(model, (3, 32, 32), dtype=dtype)


def save_model(tmp_path: Path, kind: str = "fp32", name: str = "model.onnx", **kw) -> Path:
    path = tmp_path / name
    onnx.save(make_model(kind, **kw), str(path))
    return path


def save_calib(tmp_path: Path, n: int = 10, chw: tuple[int, ...] = CHW, dtype=np.float32, key: str = "images",
               name: str = "calib") -> Path:
    from safetensors.numpy import save_file

    d = tmp_path / name
    d.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(1).normal(size=(n, *chw)).astype(dtype)
    save_file({key: arr}, str(d / "images.safetensors"))
    return d

