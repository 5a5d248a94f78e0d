"""TensorRT >= 10.0: build plans, engine builds, the INT8 calibrator, the engine inspector and :class:`TRTEngine`.

This package is the only place in dfq-deploy that imports ``tensorrt``, and it does so inside functions, so
importing any module here needs neither TensorRT nor a GPU. Every Builder, Runtime and parser shares one TensorRT
logger (:func:`~dfq_deploy.trt.env.trt_logger`). Imports run one way::

    cuda -> env -> plan -> calibrator -> planner -> build       (profiles -> planner, commands, feed)
    plan, profiles -> commands -> build
    cuda, env, timing -> compat, context -> feed, pool -> engine  (env -> inspector)

The public names are re-exported lazily from their modules.
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "require_tensorrt": "env", "tensorrt_version": "env", "gpu_available": "env", "gpu_info": "env",
    "trt_version_tuple": "env", "trt_severity_level": "env", "trt_logger": "env",
    "CudaError": "cuda", "cuda_backend": "cuda", "select_backend": "cuda", "BACKENDS": "cuda",
    "PRECISIONS": "plan", "EnginePlan": "plan", "ShapeProfile": "plan", "CalibratorSettings": "plan",
    "OnnxInfo": "planner", "inspect_onnx": "planner", "plan_build": "planner",
    "parse_batch_sizes": "profiles", "batch_profiles": "profiles", "choose_profile": "profiles",
    "describe_profiles": "profiles", "trtexec_command": "commands", "trtexec_time_command": "commands",
    "polygraphy_command": "commands", "nvidia_commands": "commands", "shell_line": "commands",
    "check_trt_version": "planner", "Decision": "planner", "MIN_TRT_VERSION": "plan",
    "CalibrationBatcher": "calibrator", "load_calib_images": "calibrator", "inspect_calib_images": "calibrator",
    "make_int8_calibrator": "calibrator", "read_cache": "calibrator", "write_cache": "calibrator",
    "build_engine": "build", "engine_metadata": "build", "engine_metadata_path": "plan",
    "format_parser_error": "build",
    "InferTiming": "timing", "summarize_timings": "timing", "check_input_shape": "timing",
    "TRTEngine": "engine", "TensorInfo": "context", "ExecSlot": "context", "SlotPool": "pool",
    "check_feed": "feed",
    "Compat": "compat", "check_engine_compat": "compat",
    "engine_layers": "inspector", "parse_engine_information": "inspector", "layer_datatypes": "inspector",
    "integer_layers": "inspector", "fused_attention_layers": "inspector", "layer_summary": "inspector",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
