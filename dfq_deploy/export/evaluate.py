"""Top-1 / top-5 accuracy of the exported artifact (ONNX Runtime) or a PyTorch model on an ImageFolder.

The export job's last stage (``export --eval-data``) and ``dfq-deploy eval``; the benchmarks report the same
figures through :func:`evaluate_predictor` (TensorRT engines: :func:`dfq_deploy.bench.accuracy.evaluate_engine`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dfq_deploy.data import ImageFolder, iter_image_batches
from dfq_deploy.device import model_device
from dfq_deploy.errors import DfqError
from dfq_deploy.models import class_names
from dfq_deploy.progress import Progress

logger = logging.getLogger(__name__)


def topk_correct(logits: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the top-k logits, for each k."""
    order = np.argsort(-logits, axis=-1)
    return {k: int((order[:, : min(k, logits.shape[-1])] == labels[:, None]).any(-1).sum()) for k in ks}


def evaluate_predictor(predict: Callable[[torch.Tensor], np.ndarray], data_dir: str | Path, data_cfg: dict[str, Any],
                       limit: int | None, batch_size: int, progress: bool, label: str,
                       class_names: Sequence[str] | None = None, num_classes: int | None = None) -> dict[str, Any]:
    """Top-1/top-5 of ``predict`` (images ``[B, C, H, W]`` -> logits) on ``data_dir``, preprocessed by ``data_cfg``.

    Class folders get the index of their name in ``class_names`` when given; else their sorted order, and their
    count must be ``num_classes`` (:class:`~dfq_deploy.data.ImageFolder`), so a partial folder never scores 0%.
    """
    total = min(len(ImageFolder(data_dir, class_names, num_classes)), limit or 1 << 60)
    counts = {1: 0, 5: 0}
    n, t0 = 0, time.perf_counter()
    with Progress(total, f"eval {label}", "img", logger, bar=progress) as bar:
        for x, y in iter_image_batches(data_dir, data_cfg, batch_size, limit, class_names=class_names,
                                       num_classes=num_classes):
            for k, c in topk_correct(predict(x), y.numpy()).items():
                counts[k] += c
            n += len(y)
            bar.update(len(y))
    return {"top1": counts[1] / n, "top5": counts[5] / n, "n": n, "data": str(data_dir),
            "seconds": time.perf_counter() - t0}


def evaluate_torch(model: nn.Module, data_dir: str | Path, data_cfg: dict[str, Any], limit: int | None = None,
                   batch_size: int = 64, progress: bool = True) -> dict[str, Any]:
    """Accuracy of a PyTorch model (float or fake-quant, labelled "simulated" by callers when quantized)."""
    model.eval()
    dev = model_device(model)

    @torch.no_grad()
    def predict(x: torch.Tensor) -> np.ndarray:
        return model(x.to(dev)).cpu().numpy()

    return evaluate_predictor(predict, data_dir, data_cfg, limit, batch_size, progress, "torch",
                              class_names(model), getattr(model, "num_classes", None))


def onnx_data_config(path: str | Path) -> dict[str, Any]:
    """The data config stored in an exported ONNX file's metadata."""
    import onnx

    from dfq_deploy.export.onnx import DATA_CONFIG_KEY

    proto = onnx.load(str(path), load_external_data=False)
    for prop in proto.metadata_props:
        if prop.key == DATA_CONFIG_KEY:
            cfg = json.loads(prop.value)
            cfg["input_size"] = tuple(cfg["input_size"])
            return cfg
    raise DfqError(f"{path} has no {DATA_CONFIG_KEY} metadata: export it with dfq-deploy, or eval with --model")


def onnx_classes(path: str | Path) -> tuple[list[str] | None, int | None]:
    """``(class names or None, number of classes or None)`` of an exported graph: its metadata and logits' width."""
    import onnx

    from dfq_deploy.export.onnx import CLASS_NAMES_KEY

    proto = onnx.load(str(path), load_external_data=False)
    names = next((json.loads(p.value) for p in proto.metadata_props if p.key == CLASS_NAMES_KEY), None)
    dims = proto.graph.output[0].type.tensor_type.shape.dim if proto.graph.output else []
    width = dims[-1].dim_value if dims and dims[-1].HasField("dim_value") else None
    return names, width


def evaluate_onnx(path: str | Path, data_dir: str | Path, limit: int | None = None, batch_size: int = 64,
                  threads: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Accuracy of an exported graph in ONNX Runtime (CPU, optimizations on: what a user deploys; float
    activations in INT4 MatMulNBits, as on TensorRT and in the accuracy benchmark)."""
    from dfq_deploy.export.ort import FLOAT_ACTIVATIONS, ort_session

    path = Path(path)
    if not path.is_file():
        raise DfqError(f"ONNX file not found: {path}")
    data_cfg = onnx_data_config(path)
    names, num_classes = onnx_classes(path)
    session = ort_session(path, threads=threads, config=FLOAT_ACTIVATIONS)
    name = session.get_inputs()[0].name

    def predict(x: torch.Tensor) -> np.ndarray:
        return session.run(None, {name: x.numpy()})[0]

    result = evaluate_predictor(predict, data_dir, data_cfg, limit, batch_size, progress, path.name, names,
                                num_classes)
    result["artifact"] = str(path)
    return result
