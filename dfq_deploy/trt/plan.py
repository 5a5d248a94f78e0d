"""The engine build plan as plain data: what :func:`dfq_deploy.trt.build.build_engine` will do.

:class:`EnginePlan` validates itself and round-trips to JSON, so a plan can be made and checked on a machine
without TensorRT and built on another.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dfq_deploy.config import GRAPH_DTYPES
from dfq_deploy.errors import DfqError
from dfq_deploy.trt.env import trt_version_tuple

#: Precisions ``plan_build`` accepts (``dfq-deploy build --precision``).
PRECISIONS = ("int8", "int4", "fp8", "fp4", "fp16", "best", "fp32")
#: Builder flags a plan may carry (names of ``tensorrt.BuilderFlag`` members); only the calibrator route sets any.
BUILDER_FLAGS = ("FP16", "INT8")
#: Calibrators ``plan_build`` accepts (``--calibrator``).
CALIBRATORS = ("synthetic",)
DEFAULT_WORKSPACE_MB = 1024
DEFAULT_CALIB_BATCH = 8

#: Oldest TensorRT dfq-deploy builds with, for every route. JetPack 6.1/6.2 ship 10.3; JetPack 6.0's 8.6 parses ONNX
#: opsets up to 17 only, and the exporter writes opset 21.
MIN_TRT_VERSION = "10.0"
#: Last TensorRT major version with implicit INT8 calibration (deprecated in 10.1, removed in 11:
#: https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html).
MAX_TRT_MAJOR_CALIBRATOR = 10
UNSUPPORTED_TRT_MESSAGE = (
    "TensorRT {version} is not supported: dfq-deploy builds with TensorRT >= 10.0 (JetPack 6.1/6.2 ship 10.3; "
    "JetPack 6.0's 8.6 cannot parse opset-21 graphs): upgrade JetPack or TensorRT"
)


def qdq_route_message(version: str) -> str:
    """The one-line error for a calibrator on a TensorRT without calibrators (11 and later)."""
    major = str(version).split(".", 1)[0] or str(version)
    return (f"TensorRT {major} has no calibrators (removed; deprecated since 10.1): use the QDQ route: dfq-deploy "
            "export --bits 8, then dfq-deploy build model.onnx --precision int8")


@dataclass(frozen=True)
class ShapeProfile:
    """One optimisation profile on the network input.

    Attributes:
        input_name: input tensor name as in the ONNX graph.
        min: smallest shape, e.g. ``(1, 3, 224, 224)``.
        opt: shape the kernels are tuned for.
        max: largest shape.
    """

    input_name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        for k in ("min", "opt", "max"):
            object.__setattr__(self, k, tuple(int(v) for v in getattr(self, k)))
        if not self.input_name:
            raise DfqError("profile: the input name is empty")
        if not (len(self.min) == len(self.opt) == len(self.max)) or not self.min:
            raise DfqError(f"profile: shapes of different ranks {self.min} / {self.opt} / {self.max}")
        if any(v < 1 for v in self.min):
            raise DfqError(f"profile: every dimension must be >= 1, got min {self.min}")
        if any(not (a <= b <= c) for a, b, c in zip(self.min, self.opt, self.max, strict=True)):
            raise DfqError(f"profile: need min <= opt <= max, got {self.min} / {self.opt} / {self.max}")
        if self.min[1:] != self.max[1:]:
            raise DfqError(f"profile: only the batch dimension may vary, got {self.min} .. {self.max}")

    @property
    def batch(self) -> tuple[int, int, int]:
        return self.min[0], self.opt[0], self.max[0]

    @property
    def exact(self) -> bool:
        """``min == opt == max``: kernels tuned for exactly this shape."""
        return self.min == self.opt == self.max

    def to_dict(self) -> dict[str, Any]:
        return {"input_name": self.input_name, "min": list(self.min), "opt": list(self.opt),
                "max": list(self.max)}


@dataclass(frozen=True)
class CalibratorSettings:
    """Implicit-INT8 calibration inputs.

    Attributes:
        calib_from: folder holding ``images.safetensors`` (saved synthetic calibration images).
        cache_file: TensorRT calibration cache (read if present, written after calibration).
        batch_size: images per calibration batch.
    """

    calib_from: str
    cache_file: str
    batch_size: int = DEFAULT_CALIB_BATCH

    def __post_init__(self) -> None:
        object.__setattr__(self, "calib_from", str(self.calib_from))
        object.__setattr__(self, "cache_file", str(self.cache_file))
        if not self.calib_from or not self.cache_file:
            raise DfqError("calibrator: calib_from and cache_file must be set")
        if int(self.batch_size) < 1:
            raise DfqError(f"calibrator: batch size {self.batch_size} must be >= 1")
        object.__setattr__(self, "batch_size", int(self.batch_size))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EnginePlan:
    """Everything :func:`build_engine` does, as plain data (JSON round-trip with :meth:`to_json`).

    Attributes:
        onnx: path of the ONNX graph.
        output: path of the engine to write.
        precision: requested precision, one of :data:`PRECISIONS`.
        strongly_typed: build a strongly typed network (every route but the calibrator's).
        builder_flags: ``tensorrt.BuilderFlag`` member names to set: only with a calibrator, never with
            ``strongly_typed``.
        workspace_mb: builder workspace memory-pool limit in MiB.
        profiles: optimisation profiles on the input, in profile-index order: one exact profile per batch size,
            then (usually) the range (:func:`dfq_deploy.trt.profiles.batch_profiles`). A plan written with a
            single ``profile`` reads as one profile.
        timing_cache: timing cache file (loaded if present, saved after the build) or None.
        calibrator: implicit-INT8 calibration settings or None.
        min_trt_version: lowest TensorRT version that can build this plan (:data:`MIN_TRT_VERSION`).
        max_trt_major: highest TensorRT major version that can build it (None: no upper bound).
        graph_quant: quantization in the graph: ``"int8"`` (Q/DQ), ``"int4"`` (INT4 weights), ``"fp8"`` (FP8 Q/DQ),
            ``"fp4"`` (NVFP4) or ``"none"``.
        graph_dtype: the graph's compute type, ``"fp16"`` or ``"fp32"`` (:data:`dfq_deploy.config.GRAPH_DTYPES`, as
            :func:`dfq_deploy.export.fp16.graph_dtype` reads it).
        notes: human-readable remarks on the decisions taken (warnings included).
    """

    onnx: str
    output: str
    precision: str
    strongly_typed: bool
    builder_flags: tuple[str, ...]
    workspace_mb: int
    profiles: tuple[ShapeProfile, ...]
    timing_cache: str | None = None
    calibrator: CalibratorSettings | None = None
    min_trt_version: str = MIN_TRT_VERSION
    max_trt_major: int | None = None
    graph_quant: str = "none"
    graph_dtype: str = "fp32"
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "onnx", str(self.onnx))
        object.__setattr__(self, "output", str(self.output))
        object.__setattr__(self, "builder_flags", tuple(self.builder_flags))
        object.__setattr__(self, "notes", tuple(self.notes))
        object.__setattr__(self, "profiles", tuple(self.profiles))
        if self.timing_cache is not None:
            object.__setattr__(self, "timing_cache", str(self.timing_cache))
        if self.precision not in PRECISIONS:
            raise DfqError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if not self.onnx or not self.output:
            raise DfqError("plan: onnx and output paths must be set")
        if Path(self.onnx) == Path(self.output):
            raise DfqError(f"plan: the engine would overwrite the ONNX file {self.onnx}: choose another "
                           "--output")
        bad = [f for f in self.builder_flags if f not in BUILDER_FLAGS]
        if bad:
            raise DfqError(f"plan: unknown builder flag(s) {bad}; allowed: {', '.join(BUILDER_FLAGS)}")
        if len(set(self.builder_flags)) != len(self.builder_flags):
            raise DfqError(f"plan: repeated builder flags {list(self.builder_flags)}")
        if self.strongly_typed and self.builder_flags:
            raise DfqError("plan: precision builder flags must not be set on a strongly typed network")
        if self.calibrator is None and self.builder_flags:
            raise DfqError(f"plan: builder flags {list(self.builder_flags)} are only set for implicit INT8 "
                           "calibration: drop them (the graph's own types decide precision)")
        if self.calibrator is None and not self.strongly_typed:
            raise DfqError("plan: only the calibrator route builds weakly typed (TensorRT 11 has no weak typing): "
                           "set strongly_typed or plan the build again")
        if int(self.workspace_mb) < 1:
            raise DfqError(f"--workspace {self.workspace_mb}: the builder workspace must be at least 1 MB")
        object.__setattr__(self, "workspace_mb", int(self.workspace_mb))
        self._check_profiles()
        if self.calibrator is not None:
            if self.strongly_typed or "INT8" not in self.builder_flags:
                raise DfqError("plan: a calibrator needs a weakly typed network with the INT8 flag")
            if self.graph_quant != "none":
                raise DfqError("plan: a calibrator cannot be used on a graph that already has Q/DQ nodes")
            if self.graph_dtype != "fp32":
                raise DfqError("plan: a calibrator needs an FP32-typed float graph: export one with dfq-deploy "
                               "export --bits 32")
        if self.graph_quant not in ("int8", "int4", "fp8", "fp4", "none"):
            raise DfqError(f"plan: unknown graph_quant {self.graph_quant!r}")
        if self.graph_dtype not in GRAPH_DTYPES:
            raise DfqError(f"plan: unknown graph_dtype {self.graph_dtype!r}; allowed: {', '.join(GRAPH_DTYPES)}")
        if trt_version_tuple(self.min_trt_version) < trt_version_tuple(MIN_TRT_VERSION):
            raise DfqError(f"plan: min_trt_version {self.min_trt_version} is below {MIN_TRT_VERSION}, the oldest "
                           "TensorRT dfq-deploy builds with: plan the build again")

    def _check_profiles(self) -> None:
        if not self.profiles or not all(isinstance(p, ShapeProfile) for p in self.profiles):
            raise DfqError("plan: profiles must be one or more ShapeProfile")
        first = self.profiles[0]
        for p in self.profiles[1:]:
            if p.input_name != first.input_name or p.min[1:] != first.min[1:]:
                raise DfqError(f"plan: every profile must be on input '{first.input_name}' {list(first.min[1:])}, "
                               f"got '{p.input_name}' {list(p.min[1:])}")
        if len(set(self.profiles)) != len(self.profiles):
            raise DfqError(f"plan: repeated profiles {[p.batch for p in self.profiles]}")

    @property
    def input_name(self) -> str:
        return self.profiles[0].input_name

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The input shape without the batch, e.g. ``(3, 224, 224)``."""
        return self.profiles[0].min[1:]

    @property
    def batch_table(self) -> list[tuple[int, int, int]]:
        """``(min, opt, max)`` batch per profile index (what :func:`~dfq_deploy.trt.profiles.choose_profile` reads)."""
        return [p.batch for p in self.profiles]

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The batch sizes with a profile of their own (``min == opt == max``)."""
        return tuple(p.opt[0] for p in self.profiles if p.exact)

    # JSON round trip
    def to_dict(self) -> dict[str, Any]:
        return {
            "onnx": self.onnx,
            "output": self.output,
            "precision": self.precision,
            "strongly_typed": self.strongly_typed,
            "builder_flags": list(self.builder_flags),
            "workspace_mb": self.workspace_mb,
            "profiles": [p.to_dict() for p in self.profiles],
            "timing_cache": self.timing_cache,
            "calibrator": self.calibrator.to_dict() if self.calibrator else None,
            "min_trt_version": self.min_trt_version,
            "max_trt_major": self.max_trt_major,
            "graph_quant": self.graph_quant,
            "graph_dtype": self.graph_dtype,
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EnginePlan:
        """Inverse of :meth:`to_dict`; a plan written before per-batch profiles (one ``profile``) reads as one profile.

        Raises:
            DfqError: missing or unknown keys, or values that fail validation.
        """
        if not isinstance(data, dict):
            raise DfqError("engine plan must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)} | {"profile"}
        unknown = sorted(set(data) - names)
        if unknown:
            raise DfqError(f"engine plan has unknown keys {unknown}")
        d = dict(data)
        if "profile" in d:  # plans written before per-batch profiles
            if "profiles" in d:
                raise DfqError("engine plan has both 'profile' and 'profiles'")
            d["profiles"] = [d.pop("profile")]
        try:
            d["profiles"] = tuple(ShapeProfile(**p) for p in d["profiles"])
            if d.get("calibrator") is not None:
                d["calibrator"] = CalibratorSettings(**d["calibrator"])
            return cls(**d)
        except (KeyError, TypeError) as exc:
            raise DfqError(f"engine plan is incomplete or malformed: {exc}") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> EnginePlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DfqError(f"engine plan is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


def engine_metadata_path(engine_path: str | Path) -> Path:
    """``model.engine`` -> ``model.engine.json`` (written by the build, read by :class:`~dfq_deploy.trt.TRTEngine`)."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")
