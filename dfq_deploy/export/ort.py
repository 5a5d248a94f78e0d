"""ONNX Runtime sessions for exported graphs (the CPU runtime and the parity oracle)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dfq_deploy.errors import DfqError

logger = logging.getLogger(__name__)

#: Session config of accuracy measurements: INT4 MatMulNBits at accuracy level 0, so W4A16's activations stay
#: float as on TensorRT (ORT's default level quantizes them to INT8 inside the kernel).
FLOAT_ACTIVATIONS = {"session.qdq_matmulnbits_accuracy_level": "0"}


def ort_session(path: str | Path | Any, threads: int | None = None, optimize: bool = True, gpu: bool = False,
                config: dict[str, str] | None = None, optimized_path: str | Path | None = None):
    """An ONNX Runtime ``InferenceSession``.

    Args:
        path: ONNX file (or an ``onnx.ModelProto``).
        threads: intra-op threads (None: ONNX Runtime's default).
        optimize: all graph optimizations (what a user deploys) or none (the reference for parity checks:
            ORT's fused integer kernels round differently).
        gpu: also request the TensorRT and CUDA execution providers, in that order, where this ONNX Runtime
            build has them (a warning names the ones it lacks); CPU is always the last provider.
        config: extra session config entries (e.g. ``session.qdq_matmulnbits_accuracy_level``).
        optimized_path: also write the optimized graph there (the latency benchmark reads which nodes ORT fused).

    Raises:
        DfqError: the file is missing or ONNX Runtime cannot load it.
    """
    import onnxruntime as ort

    if hasattr(path, "SerializeToString"):
        src: Any = path.SerializeToString()
        label = "<in-memory model>"
    else:
        p = Path(path)
        if not p.is_file():
            raise DfqError(f"ONNX file not found: {p}")
        src, label = str(p), str(p)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads:
        if threads < 1:
            raise DfqError(f"threads {threads} must be >= 1")
        so.intra_op_num_threads = int(threads)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    providers = ["CPUExecutionProvider"]
    if gpu:
        available = set(ort.get_available_providers())
        wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
        missing = [p for p in wanted if p not in available]
        if missing:
            logger.warning("ONNX Runtime %s lacks %s: using %s", ort.__version__, missing,
                           [p for p in wanted if p in available] + providers)
        providers = [p for p in wanted if p in available] + providers
    try:
        return ort.InferenceSession(src, so, providers=providers)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DfqError(f"ONNX Runtime cannot load {label}: {first}") from exc
