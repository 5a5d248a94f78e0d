"""Which GPUs run FP8 and NVFP4 engines: a table by compute capability, and the one-line refusal.

Pure functions on recorded facts (``gpu_info()``-style dicts): nothing here imports TensorRT or touches a GPU, so the
table is tested with recorded GPU descriptions. :func:`dfq_deploy.trt.build.build_engine` and
:class:`dfq_deploy.trt.engine.TRTEngine` both ask :func:`format_error` before they touch TensorRT.

Sources:

* TensorRT developer guide (10.11+, 11.x), "Working with Quantized Types": TensorRT quantizes weights and
  activations for FP8 and FP4; TensorRT operator reference, "DynamicQuantize" (NVFP4 activations).
* Which compute capabilities have the kernels: the TensorRT-RTX support matrix (1.0-1.4, "Supported Hardware": FP8
  on 8.9 and 12.0, not 8.6; FP4 GEMM on 12.0 only among 7.5/8.6/8.9/12.0) and Transformer Engine's datatype matrix
  (FP8 per tensor "requires compute capability 8.9 or higher"; NVFP4 on 10.0/10.3 and, partly, 12.0). The TensorRT
  (non-RTX) support matrix's hardware table could not be read where this was written: check it on a new GPU.
* Compute capabilities, https://developer.nvidia.com/cuda-gpus: 8.9 Ada (L4, L40S, RTX 40xx, RTX 6000 Ada), 9.0
  Hopper (H100, H200, GH200), 10.0 / 10.3 Blackwell data center (B200, GB200 / B300, GB300), 11.0 Jetson Thor (T5000,
  T4000), 12.0 / 12.1 Blackwell workstation and GeForce (RTX PRO 6000, RTX 50xx / GB10 DGX Spark). Jetson AGX Orin is
  8.7 and Ampere data center 8.0 / 8.6: no FP8 tensor cores.
* Thor's compute capability was 10.1 up to CUDA 12.x and is 11.0 from CUDA 13 (CUDA 13 renamed sm_101 to sm_110;
  PTX ISA 9.0): both numbers are in the NVFP4 range here, so a Thor reporting either is accepted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dfq_deploy.errors import DfqError

#: Format (``EnginePlan.graph_quant``) -> (lowest compute capability, architectures that have it, what to build
#: instead on an older GPU).
FORMAT_MIN_CC: dict[str, tuple[tuple[int, int], str, str]] = {
    "fp8": ((8, 9), "Ada, Hopper, Blackwell, Thor", "int8 or fp16"),
    "fp4": ((10, 0), "Blackwell, Thor", "fp8, int8 or fp16"),
}
#: Format -> the name users know it by.
FORMAT_NAMES = {"fp8": "FP8", "fp4": "NVFP4"}
#: Oldest TensorRT per format: FP8 explicit quantization is in every 10.x; FP4 and the dynamic (block)
#: quantization layer came with TensorRT 10.8 (Blackwell support; Torch-TensorRT gates its dynamic block
#: quantization converter on 10.8.0).
FORMAT_MIN_TRT = {"fp8": "10.0", "fp4": "10.8"}


def parse_cc(value: Any) -> tuple[int, int] | None:
    """``"8.9"`` / ``(8, 9)`` / ``8.9`` -> ``(8, 9)``; None when unknown."""
    if value is None or value == "":
        return None
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    major, _, minor = str(value).partition(".")
    try:
        return int(major), int(minor or 0)
    except ValueError:
        return None


def format_error(fmt: str, gpu: Mapping[str, Any]) -> str | None:
    """One line saying why ``gpu`` cannot run ``fmt`` engines, or None (it can, the format needs nothing, or the
    GPU's compute capability is unknown).

    Args:
        fmt: ``fp8``, ``fp4`` (other values: no requirement).
        gpu: ``{"name": ..., "compute_capability": "9.0"}`` (:func:`dfq_deploy.trt.env.gpu_info`).
    """
    need = FORMAT_MIN_CC.get(fmt)
    cc = parse_cc(gpu.get("compute_capability"))
    if need is None or cc is None or cc >= need[0]:
        return None
    (major, minor), archs, instead = need
    name = gpu.get("name") or "this GPU"
    return (f"{FORMAT_NAMES[fmt]} needs compute capability >= {major}.{minor} ({archs}); {name} "
            f"({cc[0]}.{cc[1]}) has none: build {instead}")


def require_format(fmt: str, gpu: Mapping[str, Any]) -> None:
    """Raise :func:`format_error`'s line as a :class:`DfqError` when ``gpu`` cannot run ``fmt``."""
    error = format_error(fmt, gpu)
    if error is not None:
        raise DfqError(error)
