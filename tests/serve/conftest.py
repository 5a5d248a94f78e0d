"""Served artifacts for the serve tests: the bundled model's export (made once per session), hand-built graphs with
the export's metadata, and engines described by a build record written by ``engine_metadata`` itself.

No engine is ever built or deserialised: ``dfq-deploy serve`` reads an engine's build record and the ONNX it was built
from, so a record made by :func:`dfq_deploy.trt.build.engine_metadata` from a real :func:`plan_build` plan, beside a
placeholder engine file, is exactly what the command sees after ``dfq-deploy build``.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch

from dfq_deploy.export.onnx import CLASS_NAMES_KEY, DATA_CONFIG_KEY
from dfq_deploy.trt.build import engine_metadata
from dfq_deploy.trt.plan import engine_metadata_path
from dfq_deploy.trt.planner import plan_build
from dfq_deploy.utils import sha256_file
from tests.trt.graphs import make_model

ORIN = {"name": "Orin", "compute_capability": "8.7"}
TINY_DATA_CONFIG = {"input_size": [3, 4, 4], "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5],
                    "std": [0.5, 0.5, 0.5], "crop_pct": 1.0, "crop_mode": "center"}


@pytest.fixture(scope="session")
def bundled_onnx(tmp_path_factory) -> Path:
    """The bundled model (``deit_tiny_cifar10``) exported W8A8 as ``dfq-deploy export`` writes it (FP16-typed, data
    config and CIFAR-10 class names in the metadata); ranges from noise, since serving reads the file's structure."""
    from dfq_deploy.config import PRESETS
    from dfq_deploy.export.onnx import save_onnx, to_onnx
    from dfq_deploy.models import ModelSpec, create_model
    from dfq_deploy.quant.qmodel import batches_loop, quantize

    torch.manual_seed(0)
    model = create_model(ModelSpec())
    images = torch.randn(8, 3, 32, 32)
    quantize(model, PRESETS["W8A8"], batches_loop(images))
    return save_onnx(to_onnx(model, calib=images), tmp_path_factory.mktemp("bundled") / "model.onnx")


def tiny_graph(path: Path, kind: str = "int8", dtype: str | None = None, batch: str | int = "batch",
               data_config: dict | None = None, class_names: list[str] | None = None) -> Path:
    """A hand-built ``input [N, 3, 4, 4] -> logits [N, 10]`` graph (:func:`tests.trt.graphs.make_model`) with the
    metadata ``to_onnx`` stores."""
    proto = make_model(kind, batch=batch, dtype=dtype)
    for key, value in ((DATA_CONFIG_KEY, data_config or TINY_DATA_CONFIG),
                       (CLASS_NAMES_KEY, class_names if class_names is not None else [f"c{i}" for i in range(10)])):
        meta = proto.metadata_props.add()
        meta.key, meta.value = key, json.dumps(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path


def fake_engine(onnx_path: Path, engine: Path, batch: str = "1,8,32", range_profile: bool = True,
                trt_version: str = "10.3.0.30", gpu: dict | None = None, precision: str = "best") -> Path:
    """A placeholder engine file with the build record ``dfq-deploy build`` would write for ``onnx_path``."""
    plan = plan_build(onnx_path, precision, batch=batch, output=engine, range_profile=range_profile)
    engine.parent.mkdir(parents=True, exist_ok=True)
    engine.write_bytes(b"placeholder: serve never deserialises the engine")
    meta = engine_metadata(plan, trt_version, gpu or ORIN, 12.5, sha256_file(onnx_path))
    engine_metadata_path(engine).write_text(json.dumps(meta))
    return engine
