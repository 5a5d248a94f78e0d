"""Parity of an exported graph with the PyTorch fake-quant model it came from.

The reference run uses ONNX Runtime on the CPU with graph optimizations disabled: ORT's fused integer
kernels (MatMulIntegerToFloat, QLinearMatMul, MatMulNBits) round differently and can flip single
quantization steps, which is a property of the kernels, not of the export.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from dfq_deploy.errors import DfqError

logger = logging.getLogger(__name__)


def reference_session(model: onnx.ModelProto | str):
    """An ONNX Runtime CPU session with every graph optimization off."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run_session(session, images: torch.Tensor | np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits of ``images`` from an ORT session, batch by batch."""
    name = session.get_inputs()[0].name
    x = images.numpy() if isinstance(images, torch.Tensor) else images
    return np.concatenate(
        [session.run(None, {name: np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32)})[0]
         for i in range(0, len(x), batch_size)]
    )


@torch.no_grad()
def run_torch(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    model.eval()
    return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]).numpy()


def compare_logits(ref: np.ndarray, out: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement and absolute logit differences between two ``[N, C]`` arrays."""
    diff = np.abs(ref.astype(np.float64) - out.astype(np.float64))
    return {
        "n": int(len(ref)),
        "top1_agreement": float(np.mean(ref.argmax(-1) == out.argmax(-1))),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "logit_scale": float(np.abs(ref).max()),
    }


def measure_parity(
    model: nn.Module, proto: onnx.ModelProto, inputs: dict[str, torch.Tensor], threshold: float = 0.99
) -> dict[str, Any]:
    """Compare ``model`` (PyTorch) and ``proto`` (ORT) on named input sets.

    Args:
        model: the fake-quant model that was exported.
        proto: the exported graph.
        inputs: e.g. ``{"calibration": x_cal, "held_back": x_val}``.
        threshold: minimum top-1 agreement on every set.

    Returns:
        ``{set name: figures, ..., "threshold": t, "passed": bool}``.
    """
    session = reference_session(proto)
    out: dict[str, Any] = {}
    for name, x in inputs.items():
        out[name] = compare_logits(run_torch(model, x), run_session(session, x))
        logger.info("parity on %s: %s", name, out[name])
    out["threshold"] = threshold
    out["passed"] = all(v["top1_agreement"] >= threshold for k, v in out.items() if isinstance(v, dict))
    return out


def require_parity(parity: dict[str, Any]) -> None:
    """Raise when the export's parity check failed."""
    if not parity["passed"]:
        worst = min(v["top1_agreement"] for v in parity.values() if isinstance(v, dict))
        raise DfqError(
            f"ONNX Runtime disagrees with the PyTorch model on {100 * (1 - worst):.1f}% of inputs "
            f"(threshold {100 * parity['threshold']:.1f}%): the export is wrong; nothing was written "
            "(lower --parity-threshold only to debug)"
        )
