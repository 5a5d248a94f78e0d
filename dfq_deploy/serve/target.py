"""The server an engine is meant for, checked against the engine's build record before any config is written.

A TensorRT engine runs only on the TensorRT release that built it and, without hardware compatibility (which
``dfq-deploy build`` does not set), only on GPUs of the compute capability it was built for
(:mod:`dfq_deploy.trt.compat` cites NVIDIA's engine-compatibility pages). A Triton server or DeepStream pipeline
given such an engine fails at load time, far from the command that wrote its config. So ``dfq-deploy serve`` takes
the target's TensorRT version, compute capability and GPU name (``--trt-version``, ``--compute-capability``,
``--gpu``) and refuses a mismatch in one line; without them it logs what the engine needs. Pure functions on recorded
facts: no TensorRT or GPU is touched.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from dfq_deploy.errors import DfqError
from dfq_deploy.serve.artifact import ServedModel
from dfq_deploy.trt.compat import VERSION_PARTS
from dfq_deploy.trt.env import trt_version_tuple

logger = logging.getLogger(__name__)

_CC = re.compile(r"^\d+\.\d+$")


@dataclass(frozen=True)
class Target:
    """What the serving machine runs; None where unknown.

    Attributes:
        trt_version: its TensorRT version, e.g. ``"10.3.0"`` (the Triton or DeepStream release's).
        compute_capability: its GPU's compute capability, e.g. ``"8.7"`` (Jetson Orin) or ``"9.0"`` (H100).
        gpu: its GPU's name, e.g. ``"NVIDIA H100 80GB HBM3"``.
    """

    trt_version: str | None = None
    compute_capability: str | None = None
    gpu: str | None = None

    def __post_init__(self) -> None:
        if self.compute_capability is not None and not _CC.match(str(self.compute_capability)):
            raise DfqError(f"--compute-capability {self.compute_capability!r}: expected MAJOR.MINOR, e.g. 8.7")
        if self.trt_version is not None:
            trt_version_tuple(self.trt_version)  # a one-line DfqError when unreadable

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.trt_version, self.compute_capability, self.gpu))


def _release(version: str) -> tuple[int, ...]:
    parts = trt_version_tuple(version)[:VERSION_PARTS]
    return parts + (0,) * (VERSION_PARTS - len(parts))


def _same_gpu(a: str, b: str) -> bool:
    def norm(name: str) -> str:
        return re.sub(r"^nvidia\s+", "", name.strip().lower())

    return norm(a) == norm(b)


def check_target(model: ServedModel, target: Target) -> list[str]:
    """Refuse an engine the target cannot load; return what is left to say (warnings).

    Args:
        model: the served model; an ONNX graph runs on any TensorRT and GPU, so only engines are checked.
        target: the serving machine as the command line describes it.

    Returns:
        Warnings: the engine's needs when no target was given, or a GPU model that differs at the same compute
        capability (TensorRT only warns then).

    Raises:
        DfqError: the record says another TensorRT release or compute capability than the target's, or another GPU
            when the target's compute capability is not given.
    """
    if model.kind != "engine":
        if target.given:
            logger.info("%s is an ONNX graph: it runs on any TensorRT and GPU, the target options check engines only",
                        model.artifact.name)
        return []
    record: dict[str, Any] = model.record or {}
    name = model.artifact.name
    built_trt, built_cc, built_gpu = (record.get(k) for k in ("tensorrt_version", "compute_capability", "gpu"))
    if target.trt_version is not None:
        if not built_trt:
            raise DfqError(f"the build record of {name} has no TensorRT version to check against "
                           f"{target.trt_version}: rebuild the engine with dfq-deploy build")
        if _release(str(built_trt)) != _release(target.trt_version):
            raise DfqError(f"{name} was built by TensorRT {built_trt} but the target runs TensorRT "
                           f"{target.trt_version}: an engine loads only on the TensorRT release that built it; build "
                           "it on the target with dfq-deploy build, or serve the ONNX")
    if target.compute_capability is not None:
        if not built_cc:
            raise DfqError(f"the build record of {name} has no compute capability to check against "
                           f"{target.compute_capability}: rebuild the engine with dfq-deploy build")
        if str(built_cc) != str(target.compute_capability):
            raise DfqError(f"{name} was built for {built_gpu or 'a GPU'} (compute capability {built_cc}) but the "
                           f"target's GPU has compute capability {target.compute_capability}: an engine loads only "
                           "on the compute capability it was built for; build it on the target, or serve the ONNX")
    warnings: list[str] = []
    if target.gpu is not None and built_gpu and not _same_gpu(str(built_gpu), target.gpu):
        if target.compute_capability is None:
            raise DfqError(f"{name} was built on {built_gpu} (compute capability {built_cc}) and the target is "
                           f"{target.gpu}: if the target's compute capability is also {built_cc}, pass "
                           f"--compute-capability {built_cc} (TensorRT then only warns), else build it on the target")
        warnings.append(f"{name} was built on {built_gpu} and is served on {target.gpu} (same compute capability "
                        f"{built_cc}): TensorRT loads it, but tactics tuned for one GPU model can be slower on another")
    if not target.given:
        warnings.append(f"{name} loads only on TensorRT {built_trt or '(unrecorded)'} and compute capability "
                        f"{built_cc or '(unrecorded)'} ({built_gpu or 'GPU unrecorded'}): pass --trt-version and "
                        "--compute-capability of the target to check it here")
    return warnings
