"""dfq-deploy: data-free quantization of Vision Transformers, deployed as TensorRT-ready QDQ ONNX.

The public API is re-exported here lazily, so that importing a PyTorch-only module (``dfq_deploy.synth``,
``dfq_deploy.quant``) never pulls in onnx or TensorRT.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_API = {
    "quantize_": "dfq_deploy.quant.recipe",
    "quantize": "dfq_deploy.quant.qmodel",
    "batches_loop": "dfq_deploy.quant.qmodel",
    "QuantConfig": "dfq_deploy.config",
    "CorrectionConfig": "dfq_deploy.config",
    "CalibrationConfig": "dfq_deploy.config",
    "PRESETS": "dfq_deploy.config",
    "preset": "dfq_deploy.config",
    "W8A8": "dfq_deploy.config",
    "W4A16": "dfq_deploy.config",
    "W3A16": "dfq_deploy.config",
    "W2A16": "dfq_deploy.config",
    "AutoConfig": "dfq_deploy.quant.search",
    "auto_quant_config": "dfq_deploy.quant.search",
    "estimate_accuracy": "dfq_deploy.quant.estimate",
    "calibration_set": "dfq_deploy.synth.run",
    "load_synth_dir": "dfq_deploy.synth.run",
    "ModelSpec": "dfq_deploy.models",
    "create_model": "dfq_deploy.models",
    "to_onnx": "dfq_deploy.export.onnx",
    "save_onnx": "dfq_deploy.export.onnx",
    "lint_onnx": "dfq_deploy.export.lint",
    "check_onnx": "dfq_deploy.export.lint",
    "ExportOptions": "dfq_deploy.pipeline",
    "export_model": "dfq_deploy.pipeline",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'dfq_deploy' has no attribute {name!r}")
