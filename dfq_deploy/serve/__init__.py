"""Serving: a Triton model repository or a DeepStream nvinfer config for an exported graph or an engine.

Reads the artifact (an ONNX graph from ``dfq-deploy export``, or an engine from ``dfq-deploy build`` with its build
record and the ONNX it was built from) and writes the config that NVIDIA's servers load, so input names, dims,
normalisation and batch sizes come from the model instead of being typed by hand. Imports run one way::

    artifact -> target, preprocess -> triton, deepstream

Nothing here imports TensorRT or needs a GPU; checking a Triton config against Triton's own schema needs the
``serve`` extra (tritonclient). The public names are re-exported lazily from their modules.
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "ServedModel": "artifact", "Tensor": "artifact", "load_served_model": "artifact", "read_record": "artifact",
    "Target": "target", "check_target": "target",
    "preprocess_recipe": "preprocess", "nvinfer_normalization": "preprocess", "NvinferNormalization": "preprocess",
    "TritonOptions": "triton", "TritonRepository": "triton", "triton_config": "triton",
    "parse_model_config": "triton", "write_triton_repository": "triton", "docker_command": "triton",
    "DeepStreamOptions": "deepstream", "DeepStreamConfig": "deepstream", "nvinfer_config": "deepstream",
    "write_deepstream_config": "deepstream", "gst_launch_command": "deepstream", "with_softmax": "deepstream",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
