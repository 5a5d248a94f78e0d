"""What a served model is, read from its files: inputs, outputs, batch profiles, preprocessing and class names.

An ONNX graph written by ``dfq-deploy export`` carries all of it: its input and output tensors (names, element types,
shapes with a symbolic batch dimension) and, in its metadata, the timm data config
(:data:`~dfq_deploy.export.onnx.DATA_CONFIG_KEY`) and the class names (:data:`~dfq_deploy.export.onnx.CLASS_NAMES_KEY`).

An engine is described by the build record ``<engine>.json`` that ``dfq-deploy build`` writes beside it
(:func:`dfq_deploy.trt.build.engine_metadata`): TensorRT version, GPU and compute capability, every optimisation
profile, the plan (input name and image shape, the graph's quantization and compute type) and the sha256 of the ONNX
it was built from. The record holds no output tensors and no preprocessing, so those are read from that ONNX graph:
the one passed beside the engine, else the record's ``plan.onnx`` path, else a file of that name beside the engine;
a recorded sha256 must match, so a re-exported graph is never taken for the engine's. Nothing here deserialises the
engine (no TensorRT or GPU needed).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from dfq_deploy.errors import DfqError
from dfq_deploy.export.lint import load_onnx
from dfq_deploy.export.onnx import CLASS_NAMES_KEY, DATA_CONFIG_KEY
from dfq_deploy.trt.plan import EnginePlan, engine_metadata_path
from dfq_deploy.trt.planner import inspect_onnx
from dfq_deploy.trt.profiles import BatchProfile
from dfq_deploy.utils import sha256_file

logger = logging.getLogger(__name__)

#: File suffixes taken for TensorRT engines (``dfq-deploy build`` writes ``.engine``).
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")

#: ONNX element type -> NumPy-style name (what the serving configs map to their own type names).
ELEMENT_TYPES = {
    TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16",
    TensorProto.DOUBLE: "float64", TensorProto.INT8: "int8", TensorProto.UINT8: "uint8",
    TensorProto.INT16: "int16", TensorProto.INT32: "int32", TensorProto.INT64: "int64", TensorProto.BOOL: "bool",
}


@dataclass(frozen=True)
class Tensor:
    """One input or output of the served model.

    Attributes:
        name: the tensor name the runtime binds.
        dtype: NumPy-style element type, e.g. ``"float32"``.
        shape: dimensions, None where the graph leaves one symbolic (the batch).
    """

    name: str
    dtype: str
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class ServedModel:
    """A model to serve and everything a serving config needs to know about it.

    Attributes:
        artifact: the file the server loads (``.onnx`` or a TensorRT engine).
        kind: ``"onnx"`` or ``"engine"``.
        onnx: the ONNX graph the inputs, outputs and metadata were read from (the artifact itself for ONNX).
        inputs: the graph inputs (one image input for models ``dfq-deploy`` exports).
        outputs: the graph outputs.
        data_config: timm's data config from the graph metadata (input size, mean, std, interpolation, crop).
        class_names: class names in label order, or None when the model has none.
        graph_quant: ``"int8"`` (Q/DQ), ``"int4"`` (INT4 weights) or ``"none"``.
        graph_dtype: the graph's compute type, ``"fp16"`` or ``"fp32"``.
        record: the engine's build record (None for ONNX).
        profiles: ``(min, opt, max)`` batch per optimisation profile of an engine, in profile-index order (empty
            for ONNX).
    """

    artifact: Path
    kind: str
    onnx: Path
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    data_config: dict[str, Any]
    class_names: tuple[str, ...] | None
    graph_quant: str
    graph_dtype: str
    record: dict[str, Any] | None = None
    profiles: tuple[BatchProfile, ...] = ()

    @property
    def input(self) -> Tensor:
        return self.inputs[0]

    @property
    def exact_batch_sizes(self) -> tuple[int, ...]:
        """An engine's batch sizes with a profile of their own (``min == opt == max``), ascending."""
        return tuple(sorted({p[0] for p in self.profiles if p[0] == p[2]}))


def _tensor(value: onnx.ValueInfoProto) -> Tensor:
    ttype = value.type.tensor_type
    if ttype.elem_type not in ELEMENT_TYPES:
        raise DfqError(f"tensor '{value.name}' has element type {TensorProto.DataType.Name(ttype.elem_type)}, "
                       "which the serving configs do not map: export the model with dfq-deploy export")
    shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in ttype.shape.dim)
    return Tensor(value.name, ELEMENT_TYPES[ttype.elem_type], shape)


def _metadata(proto: onnx.ModelProto, path: Path) -> tuple[dict[str, Any], tuple[str, ...] | None]:
    meta = {p.key: p.value for p in proto.metadata_props}
    if DATA_CONFIG_KEY not in meta:
        raise DfqError(f"{path} has no preprocessing metadata ({DATA_CONFIG_KEY}): export it with dfq-deploy export "
                       "(or save_onnx(to_onnx(model), ...)), which stores timm's mean, std and input size")
    try:
        data_cfg = dict(json.loads(meta[DATA_CONFIG_KEY]))
        names = json.loads(meta[CLASS_NAMES_KEY]) if CLASS_NAMES_KEY in meta else None
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise DfqError(f"{path} has unreadable dfq_deploy metadata ({exc}): re-export it") from exc
    for key in ("input_size", "mean", "std"):
        if key not in data_cfg:
            raise DfqError(f"{path}'s data config has no '{key}': re-export it with dfq-deploy export")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise DfqError(f"{path}'s class names are not a list of strings: re-export it")
    return data_cfg, tuple(names) if names is not None else None


def read_onnx(path: Path) -> ServedModel:
    """The served model of an exported ONNX graph.

    Raises:
        DfqError: unreadable graph, not one float image input, external weight files, or no preprocessing metadata.
    """
    proto = load_onnx(path)
    if any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise DfqError(f"{path} keeps its weights in external data files: serve a single-file graph (dfq-deploy "
                       "export writes one)")
    info = inspect_onnx(proto)
    inits = {t.name for t in proto.graph.initializer}
    inputs = tuple(_tensor(v) for v in proto.graph.input if v.name not in inits)
    outputs = tuple(_tensor(v) for v in proto.graph.output)
    if not outputs:
        raise DfqError(f"{path} has no outputs: re-export it")
    data_cfg, names = _metadata(proto, path)
    return ServedModel(path, "onnx", path, inputs, outputs, data_cfg, names, info.graph_quant, info.graph_dtype)


def read_record(engine: Path) -> dict[str, Any]:
    """The build record ``<engine>.json`` of ``engine``.

    Raises:
        DfqError: no record, or one that is not the JSON object ``dfq-deploy build`` writes.
    """
    path = engine_metadata_path(engine)
    if not path.is_file():
        raise DfqError(f"{engine} has no build record ({path.name} beside it): the serving config reads the engine's "
                       "profiles and TensorRT version from it; rebuild the engine with dfq-deploy build")
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DfqError(f"{path} is not a readable build record ({exc}): rebuild the engine with dfq-deploy "
                       "build") from exc
    if not isinstance(record, dict) or not isinstance(record.get("plan"), dict):
        raise DfqError(f"{path} has no build plan: rebuild the engine with dfq-deploy build")
    return record


def _engine_onnx(engine: Path, record: dict[str, Any], given: Path | None) -> Path:
    """The ONNX graph the engine was built from (module docstring), checked against the recorded sha256."""
    want = record.get("onnx_sha256")
    if given is not None:
        if want and sha256_file(given) != want:
            raise DfqError(f"{given} is not the graph {engine.name} was built from (its sha256 differs from the build "
                           "record's): pass the ONNX the engine was built from, or rebuild the engine")
        return given
    recorded = Path(str(record["plan"].get("onnx", "")))
    for candidate in dict.fromkeys((recorded, engine.parent / recorded.name)):
        if candidate.name and candidate.is_file() and (not want or sha256_file(candidate) == want):
            logger.info("reading %s's outputs and preprocessing from %s (the graph it was built from)", engine.name,
                        candidate)
            return candidate
    raise DfqError(f"the build record of {engine.name} names no ONNX graph found here ({recorded}) with the recorded "
                   "sha256: pass the ONNX it was built from beside the engine (its outputs and preprocessing are "
                   "read from it)")


def read_engine(engine: Path, onnx_path: Path | None = None) -> ServedModel:
    """The served model of an engine, from its build record and the ONNX it was built from.

    Raises:
        DfqError: no or a malformed build record, no matching ONNX, or a record whose input differs from the graph.
    """
    record = read_record(engine)
    try:
        plan = EnginePlan.from_dict(record["plan"])
    except DfqError as exc:
        raise DfqError(f"{engine_metadata_path(engine)} holds a malformed plan ({exc}): rebuild the engine") from exc
    graph = read_onnx(_engine_onnx(engine, record, onnx_path))
    inp = graph.input
    if plan.input_name != inp.name or tuple(plan.image_shape) != inp.shape[1:]:
        raise DfqError(f"{engine.name} was built for input '{plan.input_name}' {list(plan.image_shape)} but "
                       f"{graph.onnx.name} has '{inp.name}' {list(inp.shape[1:])}: pass the ONNX it was built from")
    return ServedModel(engine, "engine", graph.onnx, graph.inputs, graph.outputs,
                       graph.data_config, graph.class_names, plan.graph_quant, plan.graph_dtype, record,
                       tuple(plan.batch_table))


def load_served_model(artifacts: Sequence[str | Path]) -> ServedModel:
    """The model to serve from the command line's files: one ``.onnx``, or one engine (and the ONNX it was built from).

    Raises:
        DfqError: a missing file, an unknown suffix, two graphs or two engines, or any error of
            :func:`read_onnx` / :func:`read_engine`.
    """
    paths = [Path(a) for a in artifacts]
    if not paths:
        raise DfqError("no artifact given: pass an exported model.onnx, or a model.engine (with its model.onnx)")
    for p in paths:
        if not p.is_file():
            raise DfqError(f"artifact not found: {p}")
        if p.suffix.lower() != ".onnx" and p.suffix.lower() not in ENGINE_SUFFIXES:
            raise DfqError(f"{p}: expected an .onnx graph or a TensorRT engine ({', '.join(ENGINE_SUFFIXES)})")
    graphs = [p for p in paths if p.suffix.lower() == ".onnx"]
    engines = [p for p in paths if p.suffix.lower() in ENGINE_SUFFIXES]
    if len(graphs) > 1 or len(engines) > 1:
        raise DfqError(f"one model per command, got {[str(p) for p in paths]}: pass one .onnx, or one engine and the "
                       ".onnx it was built from")
    if engines:
        return read_engine(engines[0], graphs[0] if graphs else None)
    return read_onnx(graphs[0])
