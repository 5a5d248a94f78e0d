"""TensorRT engine building: plan (plain Python, runs anywhere) -> build (needs TensorRT and an NVIDIA GPU).

This is the only module of the project that imports ``tensorrt``, and it does so only inside functions, so
importing it never needs TensorRT. The work is split in two:

1. :func:`plan_build` inspects the ONNX graph with the ``onnx`` package (after the TensorRT-rules linter) and
   decides, as plain data (:class:`EnginePlan`), how TensorRT must build it:

   * INT8 Q/DQ graph, ``int8`` or ``best``: strongly typed network, no precision flags; TensorRT >= 8.6;
   * INT4-weight graph, ``int4`` or ``best``: strongly typed, no precision flags; TensorRT >= 10.0;
   * float graph, ``fp16``: weakly typed with ``FP16``; ``fp32``: weakly typed, no flags;
   * float graph, ``int8`` + calibrator: implicit INT8 (``INT8`` flag, entropy calibrator);
     TensorRT 8.6 .. 10.x;
   * float graph, ``best``: ``FP16`` (+ ``INT8`` with a calibrator);
   * float16 graph, ``fp16`` or ``best``: strongly typed (types come from the graph).

   Explicit quantization (Q/DQ) is built as a strongly typed network and precision flags are never set with
   it. Implicit INT8 (``IInt8EntropyCalibrator2``) is deprecated since TensorRT 10.1 and removed in 11.

2. :func:`build_engine` runs the TensorRT builder for a plan: Logger -> Builder -> network -> OnnxParser ->
   BuilderConfig (workspace, optimisation profile, timing cache, calibrator) -> serialised engine, written
   atomically with a ``<engine>.json`` description beside it.

The calibration helpers (:class:`CalibrationBatcher`, :func:`read_cache`, :func:`write_cache`,
:func:`load_calib_images`) are plain NumPy; :func:`make_int8_calibrator` wraps them in a TensorRT class.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from dfq_deploy.errors import DfqError, MissingDependencyError
from dfq_deploy.export.lint import load_onnx
from dfq_deploy.utils import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

#: Precisions ``plan_build`` accepts (``dfq-deploy build --precision``).
PRECISIONS = ("int8", "int4", "fp16", "best", "fp32")
#: Builder flags a plan may carry (names of ``tensorrt.BuilderFlag`` members).
BUILDER_FLAGS = ("FP16", "INT8")
#: Calibrators ``plan_build`` accepts (``--calibrator``).
CALIBRATORS = ("synthetic",)
#: File inside ``--calib-from DIR`` holding the saved synthetic calibration images.
CALIB_IMAGES_FILE = "images.safetensors"
CALIB_IMAGES_KEY = "images"

DEFAULT_WORKSPACE_MB = 1024
DEFAULT_BATCH = (1, 8, 32)
DEFAULT_CALIB_BATCH = 8

#: Minimum TensorRT versions (the project's precision / version matrix).
MIN_TRT_INT8_QDQ = "8.6"
MIN_TRT_INT4 = "10.0"
MIN_TRT_BASE = "8.6"
#: Last TensorRT major version with implicit INT8 calibration.
MAX_TRT_MAJOR_CALIBRATOR = 10
#: Highest ONNX opset TensorRT 8.6's parser supports; newer graphs need TensorRT 10.
MAX_OPSET_TRT8 = 17

TRT_MISSING_MESSAGE = (
    'TensorRT is not installed: install JetPack on Jetson or "pip install dfq-deploy[trt]" with NVIDIA\'s '
    "package index"
)
QDQ_ROUTE_MESSAGE = (
    "TensorRT {version} has no implicit INT8 calibration (IInt8EntropyCalibrator2 is deprecated since 10.1 "
    "and removed in 11): use the QDQ route instead: dfq-deploy export --bits 8, then dfq-deploy build "
    "model.onnx --precision int8"
)


# --- TensorRT and GPU discovery ---------------------------------------------------------------------------
def require_tensorrt() -> Any:
    """Import and return the ``tensorrt`` module.

    Raises:
        MissingDependencyError: TensorRT is not installed (message names how to install it).
    """
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise MissingDependencyError(TRT_MISSING_MESSAGE) from exc
    return trt


def tensorrt_version() -> str | None:
    """Version of the installed TensorRT, or None when it is not installed.

    Imports ``tensorrt`` (which needs no GPU) but never creates a Builder or Runtime. Other modules use this
    instead of importing ``tensorrt`` themselves.
    """
    try:
        trt = require_tensorrt()
    except MissingDependencyError:
        return None
    return str(getattr(trt, "__version__", "unknown"))


def _import_cudart() -> Any | None:
    """cuda-python's runtime module (new ``cuda.bindings`` layout first, then the old ``cuda.cudart``)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            return None
    return cudart


def _cuda_error_text(cudart: Any, err: Any) -> str:
    """``"cudaErrorX (description)"`` for a cuda-python error code."""
    name, desc = getattr(err, "name", str(err)), ""
    try:
        res = cudart.cudaGetErrorString(err)
        desc = res[1] if isinstance(res, tuple) else res
        desc = desc.decode() if isinstance(desc, bytes) else str(desc)
    except Exception:
        pass
    return f"{name} ({desc})" if desc else name


def gpu_available() -> tuple[bool, str]:
    """Whether a CUDA GPU is usable, probed without TensorRT.

    Uses cuda-python's ``cudaGetDeviceCount`` (which returns an error code cleanly when there is no driver),
    falling back to pycuda where only that is installed. Never creates ``trt.Builder``/``trt.Runtime``: those
    raise or crash without a driver.

    Returns:
        ``(True, "<n> CUDA device(s)")`` or ``(False, reason)``.
    """
    cudart = _import_cudart()
    if cudart is not None:
        try:
            err, count = cudart.cudaGetDeviceCount()
        except Exception as exc:
            return False, f"cudaGetDeviceCount raised {type(exc).__name__}: {exc}"
        if int(err) != 0:
            return False, f"cudaGetDeviceCount failed: {_cuda_error_text(cudart, err)}"
        if count < 1:
            return False, "no CUDA device found"
        return True, f"{count} CUDA device(s)"
    try:
        import pycuda.driver as pycuda_driver
    except ImportError:
        return False, "neither cuda-python nor pycuda is installed (pip install cuda-python)"
    try:
        pycuda_driver.init()
        count = pycuda_driver.Device.count()
    except Exception as exc:
        return False, f"pycuda could not initialise CUDA: {exc}"
    return (count > 0), (f"{count} CUDA device(s)" if count > 0 else "no CUDA device found")


def gpu_info() -> dict[str, Any]:
    """Name and compute capability of the current CUDA device (empty dict when unknown)."""
    cudart = _import_cudart()
    if cudart is None:
        try:
            import pycuda.driver as drv

            drv.init()
            dev = drv.Device(0)
            major, minor = dev.compute_capability()
            return {"name": dev.name(), "compute_capability": f"{major}.{minor}", "device": 0}
        except Exception:
            return {}
    try:
        err, dev = cudart.cudaGetDevice()
        if int(err) != 0:
            return {}
        err, prop = cudart.cudaGetDeviceProperties(dev)
        if int(err) != 0:
            return {}
        name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
        return {"name": name.rstrip("\x00"), "compute_capability": f"{prop.major}.{prop.minor}",
                "device": int(dev)}
    except Exception:
        return {}


def trt_version_tuple(version: str) -> tuple[int, ...]:
    """``"10.3.0.30"`` -> ``(10, 3, 0, 30)`` (non-numeric suffixes ignored)."""
    parts = []
    for piece in str(version).split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    if not parts:
        raise DfqError(f"cannot read the TensorRT version {version!r}")
    return tuple(parts)


# --- the plan ---------------------------------------------------------------------------------------------
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
        strongly_typed: build a strongly typed network (explicit quantization).
        builder_flags: ``tensorrt.BuilderFlag`` member names to set (never with ``strongly_typed``).
        workspace_mb: builder workspace memory-pool limit in MiB.
        profile: optimisation profile on the input.
        timing_cache: timing cache file (loaded if present, saved after the build) or None.
        calibrator: implicit-INT8 calibration settings or None.
        min_trt_version: lowest TensorRT version that can build this plan.
        max_trt_major: highest TensorRT major version that can build it (None: no upper bound).
        graph_quant: quantization in the graph: ``"int8"`` (Q/DQ), ``"int4"`` (INT4 weights) or ``"none"``.
        notes: human-readable remarks on the decisions taken.
    """

    onnx: str
    output: str
    precision: str
    strongly_typed: bool
    builder_flags: tuple[str, ...]
    workspace_mb: int
    profile: ShapeProfile
    timing_cache: str | None = None
    calibrator: CalibratorSettings | None = None
    min_trt_version: str = MIN_TRT_BASE
    max_trt_major: int | None = None
    graph_quant: str = "none"
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "onnx", str(self.onnx))
        object.__setattr__(self, "output", str(self.output))
        object.__setattr__(self, "builder_flags", tuple(self.builder_flags))
        object.__setattr__(self, "notes", tuple(self.notes))
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
        if int(self.workspace_mb) < 1:
            raise DfqError(f"--workspace {self.workspace_mb}: the builder workspace must be at least 1 MB")
        object.__setattr__(self, "workspace_mb", int(self.workspace_mb))
        if not isinstance(self.profile, ShapeProfile):
            raise DfqError("plan: profile must be a ShapeProfile")
        if self.calibrator is not None:
            if self.strongly_typed or "INT8" not in self.builder_flags:
                raise DfqError("plan: a calibrator needs a weakly typed network with the INT8 flag")
            if self.graph_quant != "none":
                raise DfqError("plan: a calibrator cannot be used on a graph that already has Q/DQ nodes")
        if self.graph_quant not in ("int8", "int4", "none"):
            raise DfqError(f"plan: unknown graph_quant {self.graph_quant!r}")
        trt_version_tuple(self.min_trt_version)  # validates

    # JSON round trip
    def to_dict(self) -> dict[str, Any]:
        return {
            "onnx": self.onnx,
            "output": self.output,
            "precision": self.precision,
            "strongly_typed": self.strongly_typed,
            "builder_flags": list(self.builder_flags),
            "workspace_mb": self.workspace_mb,
            "profile": self.profile.to_dict(),
            "timing_cache": self.timing_cache,
            "calibrator": self.calibrator.to_dict() if self.calibrator else None,
            "min_trt_version": self.min_trt_version,
            "max_trt_major": self.max_trt_major,
            "graph_quant": self.graph_quant,
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EnginePlan:
        """Inverse of :meth:`to_dict`.

        Raises:
            DfqError: missing or unknown keys, or values that fail validation.
        """
        if not isinstance(data, dict):
            raise DfqError("engine plan must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise DfqError(f"engine plan has unknown keys {unknown}")
        d = dict(data)
        try:
            d["profile"] = ShapeProfile(**d["profile"])
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


# --- ONNX inspection --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OnnxInfo:
    """What :func:`plan_build` needs to know about a graph.

    Attributes:
        input_name: the single graph input.
        input_shape: its shape, ``None`` for symbolic dimensions.
        input_dtype: ``"float32"`` or ``"float16"``.
        has_qdq: the graph has QuantizeLinear / DequantizeLinear nodes.
        has_int4: the graph has INT4 constants (weight-only INT4).
        opset: default-domain opset.
        outputs: output names.
    """

    input_name: str
    input_shape: tuple[int | None, ...]
    input_dtype: str
    has_qdq: bool
    has_int4: bool
    opset: int
    outputs: tuple[str, ...]

    @property
    def graph_quant(self) -> str:
        return "int4" if self.has_int4 else "int8" if self.has_qdq else "none"


_DTYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16"}


def inspect_onnx(model: onnx.ModelProto | str | Path) -> OnnxInfo:
    """Input, quantization and opset of an ONNX graph (no linting).

    Raises:
        DfqError: the file is missing/unreadable, or the graph does not have exactly one float input.
    """
    proto = load_onnx(model)
    graph = proto.graph
    inits = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise DfqError(f"the graph has {len(inputs)} inputs ({[i.name for i in inputs]}): dfq-deploy builds "
                       "single-input image models")
    inp = inputs[0]
    ttype = inp.type.tensor_type
    if ttype.elem_type not in _DTYPES:
        raise DfqError(f"input '{inp.name}' has type {TensorProto.DataType.Name(ttype.elem_type)}: expected "
                       "FLOAT or FLOAT16")
    shape: list[int | None] = []
    for d in ttype.shape.dim:
        shape.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None)
    if not shape:
        raise DfqError(f"input '{inp.name}' has no shape: re-export with a static input shape")
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)
    int4_types = (TensorProto.INT4, TensorProto.UINT4)
    has_int4 = any(t.data_type in int4_types for t in graph.initializer) or any(
        a.name == "value" and a.t.data_type in int4_types
        for n in graph.node if n.op_type == "Constant" for a in n.attribute
    )
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return OnnxInfo(inp.name, tuple(shape), _DTYPES[ttype.elem_type], has_qdq, has_int4, opset,
                    tuple(o.name for o in graph.output))


def parse_batch_range(text: str | Sequence[int]) -> tuple[int, int, int]:
    """``"1,8,32"`` (or ``"8"`` for a fixed batch) -> ``(1, 8, 32)``.

    Raises:
        DfqError: not one or three positive integers with ``min <= opt <= max``.
    """
    if isinstance(text, str):
        try:
            vals = [int(v) for v in text.replace(" ", "").split(",") if v]
        except ValueError as exc:
            raise DfqError(f"--batch {text!r}: expected MIN,OPT,MAX integers, e.g. 1,8,32") from exc
    else:
        vals = [int(v) for v in text]
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3 or any(v < 1 for v in vals) or not (vals[0] <= vals[1] <= vals[2]):
        raise DfqError(f"--batch {text!r}: expected MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, e.g. 1,8,32")
    return vals[0], vals[1], vals[2]


def _decide(precision: str, info: OnnxInfo, calibrated: bool) -> tuple[bool, tuple[str, ...], list[str]]:
    """Network typing and builder flags for a request on a graph (see the table in the module docstring)."""
    quant = info.graph_quant
    notes: list[str] = []
    if calibrated and quant != "none":
        raise DfqError(f"the graph already has {quant.upper()} Q/DQ nodes: a calibrator would be ignored; "
                       f"build it with --precision {quant} and without --calibrator")
    if calibrated and precision not in ("int8", "best"):
        raise DfqError(f"--calibrator only applies to --precision int8 or best, not {precision}")
    if quant == "int4":
        if precision not in ("int4", "best"):
            raise DfqError(f"the graph has INT4 weights (weight-only): build it with --precision int4, not "
                           f"{precision}")
        return True, (), ["explicit INT4 weight-only quantization: strongly typed, no precision flags"]
    if quant == "int8":
        if precision not in ("int8", "best"):
            hint = ("export a float graph (dfq-deploy export --bits 16 or 32) for " + precision
                    if precision in ("fp16", "fp32") else "export with --bits 4 for int4")
            raise DfqError(f"the graph is INT8 Q/DQ-quantized: build it with --precision int8, or {hint}")
        return True, (), ["explicit INT8 quantization (Q/DQ): strongly typed, no precision flags"]
    # float graph
    if info.input_dtype == "float16":
        if precision not in ("fp16", "best"):
            raise DfqError(f"the graph is float16: build it with --precision fp16, not {precision}")
        return True, (), ["float16 graph: strongly typed, types come from the graph"]
    if precision == "int4":
        raise DfqError("--precision int4 needs a graph with INT4 weights: export it with dfq-deploy export "
                       "--bits 4")
    if precision == "int8":
        if not calibrated:
            raise DfqError("--precision int8 on a float graph needs Q/DQ nodes or a calibrator: export with "
                           "dfq-deploy export --bits 8, or add --calibrator synthetic --calib-from DIR")
        notes.append("implicit INT8 with IInt8EntropyCalibrator2 (deprecated since TensorRT 10.1, removed in "
                     "11); prefer the QDQ route: dfq-deploy export --bits 8")
        return False, ("INT8",), notes
    if precision == "best":
        if calibrated:
            notes.append("implicit INT8 with FP16 fallback (deprecated since TensorRT 10.1, removed in 11)")
            return False, ("FP16", "INT8"), notes
        notes.append("float graph without a calibrator: 'best' builds FP16 (INT8 needs Q/DQ or a calibrator)")
        return False, ("FP16",), notes
    if precision == "fp16":
        return False, ("FP16",), ["float graph built with FP16 kernels allowed (weakly typed)"]
    return False, (), ["float graph built in FP32 (TF32 kernels may be used where the GPU has them)"]


def _profile(info: OnnxInfo, batch: Sequence[int] | str | None) -> ShapeProfile:
    rest = info.input_shape[1:]
    if any(d is None for d in rest):
        raise DfqError(f"input '{info.input_name}' has dynamic non-batch dimensions "
                       f"{list(info.input_shape)}: re-export with a fixed image size (only the batch may be "
                       "dynamic)")
    fixed = info.input_shape[0]
    if batch is None:
        b = (fixed, fixed, fixed) if fixed is not None else DEFAULT_BATCH
    else:
        b = parse_batch_range(batch)
        if fixed is not None and b != (fixed, fixed, fixed):
            raise DfqError(f"the graph has a fixed batch of {fixed}: pass --batch {fixed} or re-export "
                           "with a dynamic batch")
    tail = tuple(int(d) for d in rest)  # type: ignore[arg-type]
    return ShapeProfile(info.input_name, (b[0], *tail), (b[1], *tail), (b[2], *tail))


def plan_build(
    onnx_path: str | Path,
    precision: str,
    *,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    batch: Sequence[int] | str | None = None,
    timing_cache: str | Path | None = None,
    calibrator: str | None = None,
    calib_from: str | Path | None = None,
    calib_batch_size: int = DEFAULT_CALIB_BATCH,
    calib_cache: str | Path | None = None,
    output: str | Path | None = None,
) -> EnginePlan:
    """Lint and inspect an ONNX graph and decide how TensorRT must build it. Needs no TensorRT or GPU.

    Args:
        onnx_path: the ONNX graph (written by ``dfq-deploy export``).
        precision: one of :data:`PRECISIONS`.
        workspace_mb: builder workspace limit in MiB.
        batch: ``(min, opt, max)`` batch sizes or ``"1,8,32"``; default ``(1, 8, 32)`` for a dynamic batch,
            the fixed batch otherwise.
        timing_cache: timing cache file to load (if present) and save.
        calibrator: ``"synthetic"`` for implicit INT8 calibration on a float graph, or None.
        calib_from: folder with ``images.safetensors`` (needed with ``calibrator``).
        calib_batch_size: images per calibration batch.
        calib_cache: calibration cache file; default ``<engine stem>.calib.cache`` beside the engine.
        output: engine path; default ``<onnx stem>.engine`` beside the ONNX.

    Raises:
        DfqError: lint violations, an unreadable graph, or an inconsistent request (the message names the
            fix).
    """
    from dfq_deploy.export.lint import check_onnx

    if precision not in PRECISIONS:
        raise DfqError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if calibrator is not None and calibrator not in CALIBRATORS:
        raise DfqError(f"--calibrator {calibrator!r}: choose one of {', '.join(CALIBRATORS)}")
    if calibrator is not None and calib_from is None:
        raise DfqError("--calibrator synthetic needs --calib-from DIR (a folder holding images.safetensors)")
    if calibrator is None and calib_from is not None:
        raise DfqError("--calib-from is only used with --calibrator synthetic")
    onnx_path = Path(onnx_path)
    proto = load_onnx(onnx_path)
    check_onnx(proto)
    info = inspect_onnx(proto)
    strongly_typed, flags, notes = _decide(precision, info, calibrator is not None)
    profile = _profile(info, batch)
    out = Path(output) if output is not None else onnx_path.with_suffix(".engine")

    calib = None
    if calibrator is not None:
        assert calib_from is not None
        n, chw = inspect_calib_images(calib_from)
        _check_calib_shape(chw, profile.min[1:], Path(calib_from) / CALIB_IMAGES_FILE)
        if calib_batch_size > n:
            raise DfqError(f"calibration batch size {calib_batch_size} is larger than the {n} saved images: "
                           f"pass a batch size <= {n}")
        cache = Path(calib_cache) if calib_cache is not None else out.with_name(out.stem + ".calib.cache")
        calib = CalibratorSettings(str(calib_from), str(cache), calib_batch_size)

    min_ver = MIN_TRT_INT4 if info.has_int4 else MIN_TRT_INT8_QDQ if info.has_qdq else MIN_TRT_BASE
    if info.opset > MAX_OPSET_TRT8 and trt_version_tuple(min_ver) < (10,):
        min_ver = "10.0"
        notes.append(f"opset {info.opset}: TensorRT 8.6 parses ONNX opset <= {MAX_OPSET_TRT8}, so this graph "
                     "needs TensorRT >= 10.0")
    plan = EnginePlan(
        onnx=str(onnx_path), output=str(out), precision=precision, strongly_typed=strongly_typed,
        builder_flags=flags, workspace_mb=workspace_mb, profile=profile,
        timing_cache=str(timing_cache) if timing_cache is not None else None, calibrator=calib,
        min_trt_version=min_ver, max_trt_major=MAX_TRT_MAJOR_CALIBRATOR if calib else None,
        graph_quant=info.graph_quant, notes=tuple(notes),
    )
    for note in notes:
        (logger.warning if "deprecated" in note else logger.info)("%s", note)
    return plan


def check_trt_version(version: str, plan: EnginePlan) -> None:
    """Raise when the installed TensorRT ``version`` cannot build ``plan``.

    Raises:
        DfqError: too old for the graph, or too new for implicit calibration (names the QDQ route).
    """
    have = trt_version_tuple(version)
    need = trt_version_tuple(plan.min_trt_version)
    if have < need:
        kind = {"int4": "INT4 weights", "int8": "INT8 Q/DQ"}.get(plan.graph_quant, "float")
        raise DfqError(f"this graph ({kind}) needs TensorRT >= {plan.min_trt_version}, found {version}: upgrade "
                       "TensorRT (JetPack 6 ships 10.3)")
    if plan.max_trt_major is not None and have[0] > plan.max_trt_major:
        raise DfqError(QDQ_ROUTE_MESSAGE.format(version=version))


def resolve_network_mode(plan: EnginePlan, has_strongly_typed_flag: bool) -> tuple[bool, tuple[str, ...]]:
    """The (strongly_typed, builder flags) actually used with the installed TensorRT.

    TensorRT 8.6 has no strongly typed networks; there an explicitly quantized network is built weakly typed
    with the INT8 flag, which TensorRT 8.x requires for Q/DQ layers.
    """
    if plan.strongly_typed and not has_strongly_typed_flag:
        if plan.graph_quant == "none":
            return False, ("FP16",) if plan.precision in ("fp16", "best") else ()
        return False, ("INT8",)
    return plan.strongly_typed, plan.builder_flags


# --- calibration (plain Python) ---------------------------------------------------------------------------
class CalibrationBatcher:
    """Cuts ``[N, C, H, W]`` calibration images into batches of exactly ``batch_size``.

    The last partial batch is dropped (not padded): padding would put made-up pixels into TensorRT's
    activation histograms. ``N // batch_size`` batches are served, ``N % batch_size`` images are unused.

    Args:
        images: float array ``[N, C, H, W]`` (converted once to contiguous float32).
        batch_size: images per batch.

    Raises:
        DfqError: wrong rank, no images, or fewer images than one batch.
    """

    def __init__(self, images: np.ndarray, batch_size: int) -> None:
        arr = np.asarray(images)
        if arr.ndim != 4:
            raise DfqError(f"calibration images must be [N, C, H, W], got shape {list(arr.shape)}")
        if batch_size < 1:
            raise DfqError(f"calibration batch size {batch_size} must be >= 1")
        if len(arr) < batch_size:
            raise DfqError(f"{len(arr)} calibration images are fewer than one batch of {batch_size}: lower "
                           "the calibration batch size or save more images")
        self.images = np.ascontiguousarray(arr, dtype=np.float32)
        self.batch_size = int(batch_size)
        self.num_batches = len(self.images) // self.batch_size
        self.dropped = len(self.images) - self.num_batches * self.batch_size
        self.count = 0
        if self.dropped:
            logger.info("calibration: %d batches of %d, last %d image(s) unused", self.num_batches,
                        self.batch_size, self.dropped)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Shape of every batch."""
        return (self.batch_size, *self.images.shape[1:])  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        """Bytes of one batch (size of the device buffer it is copied to)."""
        return int(np.prod(self.shape)) * 4

    def __len__(self) -> int:
        return self.num_batches

    def next_batch(self) -> np.ndarray | None:
        """The next batch (contiguous float32, exactly ``batch_size`` images) or None when exhausted."""
        if self.count >= self.num_batches:
            return None
        start = self.count * self.batch_size
        self.count += 1
        return self.images[start : start + self.batch_size]

    def reset(self) -> None:
        """Start again from the first batch."""
        self.count = 0

    def __iter__(self):
        self.reset()
        while (batch := self.next_batch()) is not None:
            yield batch


def read_cache(path: str | Path | None) -> bytes | None:
    """Contents of a cache file (calibration or timing cache), or None if unset, missing or empty."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        return None
    data = p.read_bytes()
    return data or None


def write_cache(path: str | Path, data: bytes | bytearray | memoryview) -> Path:
    """Write a cache file atomically (temp file in the same folder, then rename)."""
    return atomic_write_bytes(path, bytes(data))


def inspect_calib_images(calib_dir: str | Path) -> tuple[int, tuple[int, int, int]]:
    """``(N, (C, H, W))`` of ``DIR/images.safetensors`` from its header, without loading the pixels.

    Raises:
        DfqError: folder or file missing, corrupt file, no ``images`` key, wrong dtype or rank.
    """
    from safetensors import SafetensorError, safe_open

    path = _calib_file(calib_dir)
    try:
        with safe_open(str(path), framework="np") as f:
            if CALIB_IMAGES_KEY not in f.keys():  # noqa: SIM118 - safe_open is not a dict
                raise DfqError(f"{path} has no '{CALIB_IMAGES_KEY}' tensor (keys: {list(f.keys())}): save "
                               f"the calibration images under the key '{CALIB_IMAGES_KEY}'")
            sl = f.get_slice(CALIB_IMAGES_KEY)
            shape, dtype = list(sl.get_shape()), sl.get_dtype()
    except SafetensorError as exc:
        raise DfqError(f"{path} is not a readable safetensors file ({exc}): save the calibration images again"
                       ) from exc
    if dtype != "F32":
        raise DfqError(f"{path}: '{CALIB_IMAGES_KEY}' is {dtype}, expected float32 (F32) normalised images")
    if len(shape) != 4 or shape[0] < 1:
        raise DfqError(f"{path}: '{CALIB_IMAGES_KEY}' has shape {shape}, expected [N, 3, H, W] with N >= 1")
    return int(shape[0]), (int(shape[1]), int(shape[2]), int(shape[3]))


def _calib_file(calib_dir: str | Path) -> Path:
    d = Path(calib_dir)
    if not d.is_dir():
        raise DfqError(f"--calib-from {d}: folder not found (it must hold {CALIB_IMAGES_FILE})")
    path = d / CALIB_IMAGES_FILE
    if not path.is_file():
        raise DfqError(f"--calib-from {d}: no {CALIB_IMAGES_FILE} in it (saved synthetic calibration images, "
                       f"key '{CALIB_IMAGES_KEY}', float32 [N, 3, H, W])")
    return path


def _check_calib_shape(chw: Sequence[int], expected: Sequence[int] | None, path: Path) -> None:
    if expected is not None and tuple(chw) != tuple(expected):
        raise DfqError(f"{path}: images are {list(chw)} (C, H, W) but the ONNX input needs {list(expected)}: "
                       "save calibration images at the model's input size")


def load_calib_images(calib_dir: str | Path, input_shape: Sequence[int] | None = None) -> np.ndarray:
    """Load saved synthetic calibration images from ``DIR/images.safetensors``.

    Args:
        calib_dir: folder holding ``images.safetensors`` with key ``images``: float32 ``[N, 3, H, W]``,
            already normalised with the model's mean/std.
        input_shape: the ONNX input's ``(C, H, W)`` (or a full ``(N, C, H, W)``; the batch is ignored).

    Returns:
        Contiguous float32 ``[N, C, H, W]``.

    Raises:
        DfqError: missing folder/file, corrupt file, missing key, wrong dtype/shape, non-finite values.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    n, chw = inspect_calib_images(calib_dir)
    path = _calib_file(calib_dir)
    if input_shape is not None:
        _check_calib_shape(chw, tuple(input_shape)[-3:], path)
    try:
        arr = load_file(str(path))[CALIB_IMAGES_KEY]
    except (SafetensorError, OSError, ValueError) as exc:
        raise DfqError(f"{path} could not be read ({exc}): save the calibration images again") from exc
    if not np.all(np.isfinite(arr)):
        raise DfqError(f"{path}: calibration images contain NaN or Inf values: regenerate them")
    logger.info("loaded %d calibration images %s from %s", n, list(chw), path)
    return np.ascontiguousarray(arr, dtype=np.float32)


def make_int8_calibrator(
    batcher: CalibrationBatcher, cache_path: str | Path, backend: str | None = None
) -> Any:
    """A ``tensorrt.IInt8EntropyCalibrator2`` that feeds ``batcher``'s batches and uses ``cache_path``.

    The returned object has ``free()`` (release its device buffer) and ``error`` (an exception raised inside a
    TensorRT callback, re-raised by :func:`build_engine` after the build).

    Args:
        batcher: calibration batches.
        cache_path: calibration cache; read if present (TensorRT then skips calibration), written after.
        backend: CUDA allocator, ``"cuda-python"`` (default) or ``"pycuda"``.

    Raises:
        MissingDependencyError: TensorRT or the CUDA Python bindings are missing.
        DfqError: this TensorRT has no implicit calibration (TensorRT >= 11): use the QDQ route.
    """
    from dfq_deploy.runtime import cuda_backend

    trt = require_tensorrt()
    base = getattr(trt, "IInt8EntropyCalibrator2", None)
    if base is None:
        raise DfqError(QDQ_ROUTE_MESSAGE.format(version=getattr(trt, "__version__", "?")))
    cuda = cuda_backend(backend)
    cache = Path(cache_path)

    class EntropyCalibrator(base):  # type: ignore[misc, valid-type]
        """Implicit-INT8 entropy calibrator over a :class:`CalibrationBatcher`."""

        def __init__(self) -> None:
            base.__init__(self)  # TensorRT requires the explicit base-class constructor call
            self.batcher = batcher
            self.cache_file = cache
            self.error: BaseException | None = None
            self._device = cuda.malloc(batcher.nbytes)

        def get_batch_size(self) -> int:
            return batcher.batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            try:
                batch = batcher.next_batch()
                if batch is None:
                    logger.info("calibration: %d batches done", batcher.num_batches)
                    return None
                cuda.copy_htod(self._device, batch)
                logger.debug("calibration batch %d/%d for %s", batcher.count, batcher.num_batches, names)
                return [int(self._device)]
            except Exception as exc:  # TensorRT callbacks must not raise: re-raised after the build
                self.error = exc
                return None

        def read_calibration_cache(self) -> bytes | None:
            data = read_cache(self.cache_file)
            if data:
                logger.info("using calibration cache %s (delete it to recalibrate)", self.cache_file)
            return data

        def write_calibration_cache(self, data: Any) -> None:
            try:
                write_cache(self.cache_file, memoryview(data).tobytes())
                logger.info("wrote calibration cache %s", self.cache_file)
            except Exception as exc:
                self.error = exc

        def free(self) -> None:
            if self._device is not None:
                cuda.free(self._device)
                self._device = None
                cuda.close()

    return EntropyCalibrator()


# --- the build --------------------------------------------------------------------------------------------
_SEVERITY_LEVELS = {
    "INTERNAL_ERROR": logging.CRITICAL,
    "ERROR": logging.ERROR,
    "WARNING": logging.WARNING,
    "INFO": logging.DEBUG,  # TensorRT's INFO is build chatter
    "VERBOSE": logging.DEBUG - 5,
}


def trt_severity_level(severity: Any) -> int:
    """Python logging level for a ``tensorrt.Logger.Severity`` (or its name)."""
    name = getattr(severity, "name", str(severity)).rsplit(".", 1)[-1].upper()
    return _SEVERITY_LEVELS.get(name, logging.INFO)


def _make_trt_logger(trt: Any, log: logging.Logger) -> Any:
    """A ``tensorrt.ILogger`` forwarding TensorRT messages to ``log``."""

    class LoggingBridge(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            level = trt_severity_level(severity)
            if log.isEnabledFor(level):
                log.log(level, "TensorRT: %s", msg)

    return LoggingBridge()


def format_parser_error(err: Any) -> str:
    """One line for an ONNX parser error: operator, node name, description, error code.

    ``node_name()``/``node_operator()`` exist from TensorRT 10; older versions give only the node index.
    """

    def call(name: str) -> Any:
        fn = getattr(err, name, None)
        try:
            return fn() if callable(fn) else None
        except Exception:
            return None

    node_name, op, index = call("node_name"), call("node_operator"), call("node")
    where = " ".join(p for p in (str(op) if op else "", f"'{node_name}'" if node_name else "") if p)
    if not where:
        where = f"node #{index}" if index is not None and index >= 0 else "graph"
    code = call("code")
    code_name = getattr(code, "name", code)
    desc = call("desc") or str(err)
    return f"{where}: {desc}" + (f" [{code_name}]" if code_name is not None else "")


def engine_metadata_path(engine_path: str | Path) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def engine_metadata(plan: EnginePlan, trt_version: str, gpu: dict[str, Any], build_seconds: float,
                    strongly_typed: bool, builder_flags: Sequence[str], onnx_sha256: str | None = None
                    ) -> dict[str, Any]:
    """The description written beside an engine (``model.engine.json``)."""
    import dfq_deploy

    return {
        "engine": plan.output,
        "tensorrt_version": trt_version,
        "gpu": gpu.get("name"),
        "compute_capability": gpu.get("compute_capability"),
        "precision": plan.precision,
        "strongly_typed": strongly_typed,
        "builder_flags": list(builder_flags),
        "profile": plan.profile.to_dict(),
        "build_seconds": round(float(build_seconds), 3),
        "onnx_sha256": onnx_sha256,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dfq_deploy": dfq_deploy.__version__,
        "plan": plan.to_dict(),
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_engine(plan: EnginePlan, log: logging.Logger | None = None) -> Path:
    """Build and write the TensorRT engine described by ``plan``.

    Steps: check TensorRT version and GPU -> Builder -> network (strongly typed for Q/DQ) -> parse the ONNX
    (every parser error logged with its node) -> BuilderConfig (workspace, profile, timing cache, calibrator)
    -> ``build_serialized_network`` -> engine written atomically, timing cache saved, ``<engine>.json``.

    Args:
        plan: from :func:`plan_build`.
        log: logger for progress and TensorRT messages (default: this module's).

    Returns:
        Path of the engine.

    Raises:
        MissingDependencyError: TensorRT or cuda-python is not installed.
        DfqError: no GPU, wrong TensorRT version, parser errors, or a failed build (nothing is written).
    """
    log = log or logger
    trt = require_tensorrt()
    version = str(getattr(trt, "__version__", "0"))
    check_trt_version(version, plan)
    ok, reason = gpu_available()
    if not ok:
        raise DfqError(f"cannot build a TensorRT engine here: no usable NVIDIA GPU ({reason})")
    onnx_path = Path(plan.onnx)
    if not onnx_path.is_file():
        raise DfqError(f"ONNX file not found: {onnx_path}")

    trt_logger = _make_trt_logger(trt, log)
    builder = trt.Builder(trt_logger)
    st_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    strongly_typed, flags = resolve_network_mode(plan, st_flag is not None)
    if strongly_typed != plan.strongly_typed:
        log.warning("TensorRT %s has no strongly typed networks: building weakly typed with flags %s",
                    version, list(flags))
    network = builder.create_network(1 << int(st_flag) if strongly_typed else 0)
    parser = trt.OnnxParser(network, trt_logger)
    log.info("parsing %s (TensorRT %s)", onnx_path, version)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [format_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        for e in errors:
            log.error("ONNX parser: %s", e)
        first = errors[0] if errors else "unknown error"
        more = f" (+{len(errors) - 1} more, see the log)" if len(errors) > 1 else ""
        raise DfqError(f"TensorRT {version} could not parse {onnx_path}: {first}{more}")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if plan.profile.input_name not in names:
        raise DfqError(f"the network has inputs {names}, the plan profiles '{plan.profile.input_name}': "
                       "plan the build again")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_mb << 20)
    for name in flags:
        member = getattr(trt.BuilderFlag, name, None)
        if member is None:
            raise DfqError(f"TensorRT {version} has no BuilderFlag.{name} (networks are strongly typed "
                           "only): use a Q/DQ graph (dfq-deploy export --bits 8) or TensorRT 10")
        config.set_flag(member)
    prof = builder.create_optimization_profile()
    prof.set_shape(plan.profile.input_name, plan.profile.min, plan.profile.opt, plan.profile.max)
    config.add_optimization_profile(prof)

    timing_cache = None
    if plan.timing_cache:
        data = read_cache(plan.timing_cache) or b""
        timing_cache = config.create_timing_cache(data)
        if not config.set_timing_cache(timing_cache, False):
            log.warning("timing cache %s does not match this TensorRT/GPU: starting a new one",
                        plan.timing_cache)
            timing_cache = config.create_timing_cache(b"")
            config.set_timing_cache(timing_cache, False)
        log.info("timing cache %s (%s)", plan.timing_cache, f"{len(data)} bytes" if data else "new")

    calib = None
    try:
        if plan.calibrator is not None:
            cs = plan.calibrator
            images = load_calib_images(cs.calib_from, plan.profile.min[1:])
            batcher = CalibrationBatcher(images, cs.batch_size)
            calib = make_int8_calibrator(batcher, cs.cache_file)
            config.int8_calibrator = calib
            cprof = builder.create_optimization_profile()
            cshape = batcher.shape
            cprof.set_shape(plan.profile.input_name, cshape, cshape, cshape)
            config.set_calibration_profile(cprof)
            log.info("implicit INT8 calibration on %d x %d images from %s", batcher.num_batches,
                     batcher.batch_size, cs.calib_from)

        log.info("building %s engine (workspace %d MB, batch %s); this can take minutes", plan.precision,
                 plan.workspace_mb, plan.profile.batch)
        t0 = time.perf_counter()
        try:
            serialized = builder.build_serialized_network(network, config)
        except RuntimeError as exc:
            raise DfqError(f"TensorRT failed to build the engine: {exc}") from exc
        build_s = time.perf_counter() - t0
        if calib is not None and calib.error is not None:
            raise DfqError(f"calibration failed: {calib.error}") from calib.error
    finally:
        if calib is not None:
            calib.free()
    if serialized is None:
        raise DfqError("TensorRT failed to build the engine (errors above); if it ran out of memory, raise "
                       "--workspace or lower the max --batch")

    out = Path(plan.output)
    atomic_write_bytes(out, memoryview(serialized).tobytes())
    if timing_cache is not None and plan.timing_cache:
        write_cache(plan.timing_cache, memoryview(config.get_timing_cache().serialize()).tobytes())
    meta = engine_metadata(plan, version, gpu_info(), build_s, strongly_typed, flags, _sha256(onnx_path))
    atomic_write_json(engine_metadata_path(out), meta)
    log.info("wrote %s (%.2f MB) in %.1f s", out, out.stat().st_size / 1e6, build_s)
    return out


__all__ = [
    "PRECISIONS", "CalibrationBatcher", "CalibratorSettings", "EnginePlan", "OnnxInfo", "ShapeProfile",
    "build_engine", "check_trt_version", "engine_metadata", "engine_metadata_path", "format_parser_error",
    "gpu_available", "gpu_info", "inspect_calib_images", "inspect_onnx", "load_calib_images",
    "make_int8_calibrator", "parse_batch_range", "plan_build", "read_cache", "require_tensorrt",
    "resolve_network_mode", "tensorrt_version", "trt_severity_level", "trt_version_tuple", "write_cache",
]
