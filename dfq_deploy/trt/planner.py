"""Deciding how TensorRT must build an ONNX graph (:func:`plan_build`); plain Python, runs anywhere.

* INT8 Q/DQ graph, ``int8`` or ``best``: strongly typed network, no precision flags; TensorRT >= 8.6;
* INT4-weight graph, ``int4`` or ``best``: strongly typed, no precision flags; TensorRT >= 10.0;
* float graph, ``fp16``: weakly typed with ``FP16``; ``fp32``: weakly typed, no flags;
* float graph, ``int8`` + calibrator: implicit INT8 (``INT8`` flag, entropy calibrator); TensorRT 8.6 .. 10.x;
* float graph, ``best``: ``FP16`` (+ ``INT8`` with a calibrator);
* float16 graph, ``fp16`` or ``best``: strongly typed (types come from the graph).

Explicit quantization (Q/DQ) is built as a strongly typed network and precision flags are never set with it.
Implicit INT8 (``IInt8EntropyCalibrator2``) is deprecated since TensorRT 10.1 and removed in 11.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

from dfq_deploy.errors import DfqError
from dfq_deploy.export.lint import load_onnx
from dfq_deploy.trt.calibrator import CALIB_IMAGES_FILE, check_calib_shape, inspect_calib_images
from dfq_deploy.trt.env import trt_version_tuple
from dfq_deploy.trt.plan import (
    CALIBRATORS,
    DEFAULT_BATCH,
    DEFAULT_CALIB_BATCH,
    DEFAULT_WORKSPACE_MB,
    MAX_OPSET_TRT8,
    MAX_TRT_MAJOR_CALIBRATOR,
    MIN_TRT_BASE,
    MIN_TRT_INT4,
    MIN_TRT_INT8_QDQ,
    PRECISIONS,
    QDQ_ROUTE_MESSAGE,
    CalibratorSettings,
    EnginePlan,
    ShapeProfile,
)

logger = logging.getLogger(__name__)


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
        check_calib_shape(chw, profile.min[1:], Path(calib_from) / CALIB_IMAGES_FILE)
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

