"""Whether an engine file can run here: its TensorRT version and GPU against this machine's.

"By default, TensorRT engines are compatible only with the version of TensorRT used to build them", and
without hardware-compatibility mode "engines are not portable across different GPU architectures"
(https://docs.nvidia.com/deeplearning/tensorrt/11.1.0/inference-library/engine-compatibility.html and the
Engine Portability box of the 10.16.1 / 11.x support matrices). ``dfq-deploy build`` sets neither
``VERSION_COMPATIBLE`` nor a hardware-compatibility level, so its engines are tied to both. TensorRT has no
compatibility preflight API (11.4 support matrix: deserialise and require a non-null engine), and a foreign
engine fails with a TensorRT error that does not say why. So before deserialising,
:class:`~dfq_deploy.trt.engine.TRTEngine` compares the ``<engine>.json`` that ``dfq-deploy build`` wrote beside
the engine with this machine, and refuses with one line that names both sides and the fix.

Pure functions on recorded facts: nothing here imports TensorRT or touches a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dfq_deploy.trt.env import trt_version_tuple

logger = logging.getLogger(__name__)

#: Version components that must match: major.minor.patch (the fourth, the build number, may differ).
VERSION_PARTS = 3


def _release(version: str) -> tuple[int, ...]:
    """``"10.3.0.30"`` -> ``(10, 3, 0)``; ``"10.3"`` -> ``(10, 3, 0)`` (missing parts are 0)."""
    parts = trt_version_tuple(version)[:VERSION_PARTS]
    return parts + (0,) * (VERSION_PARTS - len(parts))


@dataclass(frozen=True)
class Compat:
    """The verdict on one engine.

    Attributes:
        error: why the engine cannot run here (None when it can, or when nothing is known).
        warnings: what may still go wrong (same compute capability on another GPU model; no build record).
    """

    error: str | None
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None


def check_engine_compat(meta: Mapping[str, Any], trt_version: str, gpu: Mapping[str, Any],
                        engine_name: str = "the engine") -> Compat:
    """Compare an engine's build record with the TensorRT and GPU of this process.

    Args:
        meta: the ``<engine>.json`` written by ``dfq-deploy build`` (``tensorrt_version``, ``gpu``,
            ``compute_capability``); empty when there is none.
        trt_version: ``tensorrt.__version__`` here.
        gpu: :func:`~dfq_deploy.trt.env.gpu_info` here (``name``, ``compute_capability``); may be empty.
        engine_name: how to name the engine in messages.

    Returns:
        A :class:`Compat`: ``error`` when the TensorRT version (major.minor.patch) or the GPU's compute
        capability differs; a warning when only the GPU model differs (TensorRT itself only warns then) or when
        there is no build record to check.
    """
    if not meta:
        return Compat(None, (f"{engine_name} has no build record (.json beside it): its TensorRT version and "
                             "GPU cannot be checked before deserialising",))
    warnings: list[str] = []
    built_trt = meta.get("tensorrt_version")
    if built_trt:
        built, here = _release(str(built_trt)), _release(trt_version)
        if built != here:
            return Compat(f"{engine_name} was built by TensorRT {built_trt} but this is TensorRT {trt_version}: "
                          "engines run only on the TensorRT version that built them; rebuild it here with "
                          "dfq-deploy build")
    built_cc, here_cc = meta.get("compute_capability"), gpu.get("compute_capability")
    built_gpu, here_gpu = meta.get("gpu"), gpu.get("name")
    if built_cc and here_cc and str(built_cc) != str(here_cc):
        return Compat(f"{engine_name} was built for {built_gpu or 'a GPU'} (compute capability {built_cc}) but "
                      f"this GPU is {here_gpu or 'another GPU'} (compute capability {here_cc}): engines run only "
                      "on the GPU they were built for; rebuild it here with dfq-deploy build")
    if built_gpu and here_gpu and str(built_gpu) != str(here_gpu):
        warnings.append(f"{engine_name} was built on {built_gpu} and runs on {here_gpu} (same compute capability "
                        f"{here_cc}): TensorRT allows this but tactics tuned for one GPU model may be slower or "
                        "fail on another; rebuild it here for the best engine")
    return Compat(None, tuple(warnings))
