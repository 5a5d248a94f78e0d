"""Deciding how TensorRT must build an ONNX graph (:func:`plan_build`); plain Python, runs anywhere.

TensorRT >= 10.0 for every route (JetPack 6.0's 8.6 cannot parse the exporter's opset-21 graphs). The float type
is the graph's compute type (:func:`dfq_deploy.export.fp16.graph_dtype`, from its initializers), not its input
type: exported graphs keep a float32 input and output either way.

==========================  ==================  ========================================================
graph                       precision           build
==========================  ==================  ========================================================
INT8 Q/DQ                   ``int8``, ``best``  strongly typed, no flags (FP32-typed graph: warning)
INT4 weights (W4A16)        ``int4``, ``best``  strongly typed, no flags (FP32-typed graph: warning)
FP8 Q/DQ (FP8)              ``fp8``, ``best``   strongly typed, no flags; GPU compute capability >= 8.9
NVFP4 (NVFP4)               ``fp4``, ``best``   strongly typed, no flags; >= 10.0 (Blackwell, Thor), TensorRT >= 10.8
FP16 float                  ``fp16``, ``best``  strongly typed, no flags
FP16 float                  ``fp32``            error: export an FP32 graph (``--bits 32``)
FP32 float                  ``fp32``            strongly typed, no flags
FP32 float                  ``fp16``            error: TensorRT 11 has no FP16 flag, export ``--bits 16``
FP32 float                  ``best``            strongly typed FP32, warning suggesting ``--bits 16``
FP32 float + calibrator     ``int8``, ``best``  weakly typed, ``FP16`` + ``INT8`` flags; TensorRT 10.x only
FP16 float + calibrator     ``int8``, ``best``  error: the calibrator needs an FP32 graph (``--bits 32``)
float                       ``int4``            error: export ``--bits 4``
float, no calibrator        ``int8``            error: export ``--bits 8`` or add ``--calibrator``
Q/DQ + calibrator           any                 error: the graph is already quantized
==========================  ==================  ========================================================

Strongly typed networks take their types from the graph and must not get precision flags ("Use explicit
quantization with Strong Typing. Precision-control build flags are not required and should not be specified",
https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-quantization.html);
TensorRT 11 removed the FP16/INT8 flags and weak typing altogether. Implicit INT8 (``IInt8EntropyCalibrator2``)
is deprecated since 10.1 and removed in 11; it sets FP16 and INT8 together, as ``trtexec --best`` does, so layers
TensorRT does not run in INT8 may still run in FP16 rather than only FP32.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

from dfq_deploy.errors import DfqError
from dfq_deploy.export.fp16 import graph_dtype
from dfq_deploy.export.lint import load_onnx
from dfq_deploy.trt.calibrator import CALIB_IMAGES_FILE, check_calib_shape, inspect_calib_images
from dfq_deploy.trt.env import trt_version_tuple
from dfq_deploy.trt.formats import FORMAT_MIN_TRT
from dfq_deploy.trt.plan import (
    CALIBRATORS,
    DEFAULT_CALIB_BATCH,
    DEFAULT_WORKSPACE_MB,
    MAX_TRT_MAJOR_CALIBRATOR,
    MIN_TRT_VERSION,
    PRECISIONS,
    UNSUPPORTED_TRT_MESSAGE,
    CalibratorSettings,
    EnginePlan,
    ShapeProfile,
    qdq_route_message,
)
from dfq_deploy.trt.profiles import DEFAULT_BATCH_SIZES, batch_profiles, parse_batch_sizes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OnnxInfo:
    """What :func:`plan_build` needs to know about a graph.

    Attributes:
        input_name: the single graph input.
        input_shape: its shape, ``None`` for symbolic dimensions.
        input_dtype: ``"float32"`` or ``"float16"`` (exported graphs: always float32, so not the compute type).
        graph_dtype: the compute type, ``"fp16"`` or ``"fp32"`` (:func:`dfq_deploy.export.fp16.graph_dtype`).
        has_qdq: the graph has QuantizeLinear / DequantizeLinear nodes.
        has_int4: the graph has INT4 constants (weight-only INT4).
        opset: default-domain opset.
        has_fp8: FP8 (FLOAT8E4M3FN) constants (FP8 weights or zero points).
        has_fp4: FP4 constants or TensorRT's dynamic FP4 quantization (NVFP4).
        outputs: output names.
    """

    input_name: str
    input_shape: tuple[int | None, ...]
    input_dtype: str
    graph_dtype: str
    has_qdq: bool
    has_int4: bool
    opset: int
    outputs: tuple[str, ...]
    has_fp8: bool = False
    has_fp4: bool = False

    @property
    def graph_quant(self) -> str:
        """``"fp4"`` (NVFP4), ``"fp8"`` (FP8 Q/DQ), ``"int4"`` (INT4 weights), ``"int8"`` (Q/DQ nodes) or ``"none"``
        (a float graph); a mixed-precision graph is named by its most demanding format."""
        if self.has_fp4:
            return "fp4"
        if self.has_fp8:
            return "fp8"
        return "int4" if self.has_int4 else "int8" if self.has_qdq else "none"


_DTYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16"}


def inspect_onnx(model: onnx.ModelProto | str | Path) -> OnnxInfo:
    """Input, compute type, quantization and opset of an ONNX graph (no linting).

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
    types = {t.data_type for t in graph.initializer}
    has_fp4 = TensorProto.FLOAT4E2M1 in types or any(n.domain == "trt" for n in graph.node)
    return OnnxInfo(inp.name, tuple(shape), _DTYPES[ttype.elem_type], graph_dtype(proto), has_qdq, has_int4, opset,
                    tuple(o.name for o in graph.output), TensorProto.FLOAT8E4M3FN in types, has_fp4)


FP32_TYPED_WARNING = ("the graph is FP32-typed: TensorRT keeps FP32 between the integer layers; re-export with "
                      "--dtype fp16 (the default)")


@dataclass(frozen=True)
class Decision:
    """How to build one graph at one precision (see the table in the module docstring).

    Attributes:
        strongly_typed: create the network with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``.
        flags: ``tensorrt.BuilderFlag`` names to set (the calibrator route only).
        notes: remarks logged at INFO; warnings: remarks logged at WARNING.
    """

    strongly_typed: bool
    flags: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def _decide(precision: str, info: OnnxInfo, calibrated: bool) -> Decision:
    """Network typing and builder flags for ``precision`` on the graph ``info`` (pure; module docstring table).

    Raises:
        DfqError: the request does not fit the graph (the message names the export or flag that does).
    """
    quant, dtype = info.graph_quant, info.graph_dtype
    fp32_warn = (FP32_TYPED_WARNING,) if dtype == "fp32" else ()
    if calibrated and quant != "none":
        raise DfqError(f"the graph already has {quant.upper()} Q/DQ nodes: a calibrator would be ignored; build it "
                       f"with --precision {quant} and without --calibrator")
    if calibrated and precision not in ("int8", "best"):
        raise DfqError(f"--calibrator only applies to --precision int8 or best, not {precision}")
    if quant in ("fp8", "fp4"):
        from dfq_deploy.trt.formats import FORMAT_MIN_CC, FORMAT_NAMES

        name = FORMAT_NAMES[quant]
        if precision not in (quant, "best"):
            raise DfqError(f"the graph is {name}-quantized: build it with --precision {quant}, not {precision}")
        (major, minor), archs, _ = FORMAT_MIN_CC[quant]
        # strongly typed: TensorRT 10 NetworkDefinitionCreationFlag.STRONGLY_TYPED, TensorRT 11 always ("Use explicit
        # quantization with Strong Typing"; FP8/FP4 Q/DQ graphs need no precision flags)
        return Decision(True, (), (f"explicit {name} quantization: strongly typed, no precision flags; runs on "
                                   f"compute capability >= {major}.{minor} ({archs})",), fp32_warn)
    if quant == "int4":
        if precision not in ("int4", "best"):
            raise DfqError(f"the graph has INT4 weights (weight-only): build it with --precision int4, not "
                           f"{precision}")
        return Decision(True, (), ("explicit INT4 weight-only quantization: strongly typed, no precision flags",),
                        fp32_warn)
    if quant == "int8":
        if precision not in ("int8", "best"):
            hint = {"fp16": "export an FP16 float graph (dfq-deploy export --bits 16) for fp16",
                    "fp32": "export an FP32 float graph (dfq-deploy export --bits 32) for fp32"}.get(
                        precision, "export with --bits 4 for int4")
            raise DfqError(f"the graph is INT8 Q/DQ-quantized: build it with --precision int8, or {hint}")
        return Decision(True, (), ("explicit INT8 quantization (Q/DQ): strongly typed, no precision flags",),
                        fp32_warn)
    # a float graph
    if precision == "int4":
        raise DfqError("--precision int4 needs a graph with INT4 weights: export it with dfq-deploy export --bits 4")
    if precision in ("fp8", "fp4"):
        raise DfqError(f"--precision {precision} needs a graph exported in that format: dfq-deploy export --bits "
                       f"{'fp8' if precision == 'fp8' else 'nvfp4'}")
    if calibrated:
        if dtype != "fp32":
            # Calibrating through FP16 Casts and weights is covered by no TensorRT doc found and untried here:
            # refuse with the export that works (FP32 weights; TensorRT picks FP16/INT8 per layer) over guessing.
            raise DfqError("the graph is FP16-typed and implicit INT8 calibration needs an FP32 float graph: export "
                           "one with dfq-deploy export --bits 32, or use the QDQ route (dfq-deploy export --bits 8)")
        # FP16 with INT8, as trtexec --best: layers TensorRT does not run in INT8 may still use FP16
        return Decision(False, ("FP16", "INT8"), ("implicit INT8 with FP16 fallback: weakly typed, FP16 + INT8 "
                                                  "builder flags, IInt8EntropyCalibrator2",),
                        ("implicit INT8 calibration is deprecated since TensorRT 10.1 and removed in 11; prefer the "
                         "QDQ route: dfq-deploy export --bits 8",))
    if precision == "int8":
        raise DfqError("--precision int8 on a float graph needs Q/DQ nodes or a calibrator: export with dfq-deploy "
                       "export --bits 8, or add --calibrator synthetic --calib-from DIR")
    if dtype == "fp16":
        if precision == "fp32":
            raise DfqError("the graph is FP16-typed: build it with --precision fp16, or export an FP32 float graph "
                           "(dfq-deploy export --bits 32) for fp32")
        return Decision(True, (), ("FP16 float graph: strongly typed, no precision flags (types come from the "
                                   "graph)",))
    if precision == "fp16":
        raise DfqError("the graph is FP32-typed and TensorRT 11 has no FP16 flag: export an FP16 graph (dfq-deploy "
                       "export --bits 16)")
    if precision == "best":
        return Decision(True, (), ("FP32 float graph: strongly typed, no precision flags",),
                        ("the graph is FP32-typed, so 'best' builds FP32 (strongly typed networks keep the graph's "
                         "types): export an FP16 graph (dfq-deploy export --bits 16) for FP16 kernels",))
    return Decision(True, (), ("FP32 float graph: strongly typed, no precision flags",))


def _profiles(info: OnnxInfo, batch: Sequence[int] | str | None, range_profile: bool) -> tuple[ShapeProfile, ...]:
    """One exact profile per batch size, then the range (:func:`~dfq_deploy.trt.profiles.batch_profiles`)."""
    rest = info.input_shape[1:]
    if any(d is None for d in rest):
        raise DfqError(f"input '{info.input_name}' has dynamic non-batch dimensions "
                       f"{list(info.input_shape)}: re-export with a fixed image size (only the batch may be "
                       "dynamic)")
    fixed = info.input_shape[0]
    if batch is None:
        sizes = (fixed,) if fixed is not None else DEFAULT_BATCH_SIZES
    else:
        sizes = parse_batch_sizes(batch)
        if fixed is not None and sizes != (fixed,):
            raise DfqError(f"the graph has a fixed batch of {fixed}: pass --batch {fixed} or re-export "
                           "with a dynamic batch")
    tail = tuple(int(d) for d in rest)  # type: ignore[arg-type]
    return tuple(ShapeProfile(info.input_name, (lo, *tail), (opt, *tail), (hi, *tail))
                 for lo, opt, hi in batch_profiles(sizes, range_profile))


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
    range_profile: bool = True,
) -> EnginePlan:
    """Lint and inspect an ONNX graph and decide how TensorRT must build it. Needs no TensorRT or GPU.

    Args:
        onnx_path: the ONNX graph (written by ``dfq-deploy export``).
        precision: one of :data:`PRECISIONS`.
        workspace_mb: builder workspace limit in MiB.
        batch: batch sizes, ``(1, 8, 32)`` or ``"1,8,32"``: one profile each with ``min = opt = max``, so
            every size runs on kernels tuned for it; default ``(1, 8, 32)`` for a dynamic batch, the fixed
            batch otherwise.
        timing_cache: timing cache file to load (if present) and save.
        calibrator: ``"synthetic"`` for implicit INT8 calibration on a float graph, or None.
        calib_from: folder with ``images.safetensors`` (needed with ``calibrator``).
        calib_batch_size: images per calibration batch.
        calib_cache: calibration cache file; default ``<engine stem>.calib.cache`` beside the engine.
        output: engine path; default ``<onnx stem>.engine`` beside the ONNX.
        range_profile: add a last profile over ``min..max`` of the sizes, so other batch sizes run too
            (:mod:`dfq_deploy.trt.profiles`).

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
    for v in check_onnx(proto):
        logger.warning("TensorRT advisory: %s", v)
    info = inspect_onnx(proto)
    decision = _decide(precision, info, calibrator is not None)
    profiles = _profiles(info, batch, range_profile)
    out = Path(output) if output is not None else onnx_path.with_suffix(".engine")

    calib = None
    if calibrator is not None:
        assert calib_from is not None
        n, chw = inspect_calib_images(calib_from)
        check_calib_shape(chw, profiles[0].min[1:], Path(calib_from) / CALIB_IMAGES_FILE)
        if calib_batch_size > n:
            raise DfqError(f"calibration batch size {calib_batch_size} is larger than the {n} saved images: "
                           f"pass a batch size <= {n}")
        cache = Path(calib_cache) if calib_cache is not None else out.with_name(out.stem + ".calib.cache")
        calib = CalibratorSettings(str(calib_from), str(cache), calib_batch_size)

    plan = EnginePlan(
        onnx=str(onnx_path), output=str(out), precision=precision, strongly_typed=decision.strongly_typed,
        builder_flags=decision.flags, workspace_mb=workspace_mb, profiles=profiles,
        timing_cache=str(timing_cache) if timing_cache is not None else None, calibrator=calib,
        min_trt_version=FORMAT_MIN_TRT.get(info.graph_quant, MIN_TRT_VERSION),
        max_trt_major=MAX_TRT_MAJOR_CALIBRATOR if calib else None,
        graph_quant=info.graph_quant, graph_dtype=info.graph_dtype, notes=decision.notes + decision.warnings,
    )
    for level, texts in ((logging.INFO, decision.notes), (logging.WARNING, decision.warnings)):
        for text in texts:
            logger.log(level, "%s", text)
    return plan


def check_trt_version(version: str, plan: EnginePlan | None = None) -> None:
    """Raise when the installed TensorRT ``version`` cannot build ``plan`` (or any plan, when None).

    Raises:
        DfqError: TensorRT older than 10.0 (names the JetPack / TensorRT upgrade), older than the plan's
            ``min_trt_version``, or a calibrator plan on TensorRT 11+ (names the QDQ route).
    """
    have = trt_version_tuple(version)
    if have < trt_version_tuple(MIN_TRT_VERSION):
        raise DfqError(UNSUPPORTED_TRT_MESSAGE.format(version=version))
    if plan is None:
        return
    if have < trt_version_tuple(plan.min_trt_version):
        raise DfqError(f"this plan needs TensorRT >= {plan.min_trt_version}, found {version}: upgrade JetPack or "
                       "TensorRT")
    if plan.max_trt_major is not None and have[0] > plan.max_trt_major:
        raise DfqError(qdq_route_message(version))
