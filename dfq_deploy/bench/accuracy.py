"""Accuracy of a TensorRT engine on an ImageFolder (ONNX Runtime and PyTorch: :mod:`dfq_deploy.export.evaluate`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfq_deploy.errors import DfqError
from dfq_deploy.export.evaluate import evaluate_predictor, onnx_classes, onnx_data_config


def evaluate_engine(path: str | Path, data_dir: str | Path, limit: int | None = None, batch_size: int = 32,
                    progress: bool = True) -> dict[str, Any]:
    """Accuracy of a TensorRT engine (needs TensorRT and a GPU), preprocessed with the data config of the ONNX
    graph it was built from (named in its ``<engine>.json``); ``batch_size`` must lie in its profile."""
    from dfq_deploy.trt.engine import TRTEngine

    with TRTEngine(path) as engine:
        onnx_path = (engine.build_info.get("plan") or {}).get("onnx")
        if not onnx_path:
            raise DfqError(f"{path} has no <engine>.json naming its ONNX graph: build it with dfq-deploy build")
        data_cfg = onnx_data_config(onnx_path)
        bmin, _, bmax = engine.batch_range

        def predict(x: torch.Tensor) -> np.ndarray:
            n = len(x)  # the last batch may be below the profile's minimum: pad it, drop the padding
            if n < bmin:
                x = torch.cat([x, x[-1:].expand(bmin - n, *x.shape[1:])])
            return np.asarray(engine.infer(np.ascontiguousarray(x.numpy())))[:n]

        result = evaluate_predictor(predict, data_dir, data_cfg, limit, min(batch_size, bmax), progress,
                                    Path(path).name, *onnx_classes(onnx_path))
    result["artifact"] = str(path)
    return result
