"""What a built engine runs, from TensorRT's engine inspector: per-layer precisions, tactics, fused attention.

:func:`engine_layers` needs TensorRT and a GPU: it deserialises the engine with the shared
:func:`~dfq_deploy.trt.env.trt_logger` and returns the inspector's per-layer JSON. The helpers below it are plain
Python over those dicts, so they are tested without TensorRT.

The layer dicts are those of TensorRT 10.x built with ``ProfilingVerbosity.DETAILED`` (every
``dfq-deploy build`` sets it): ``Name``, ``LayerType``, ``Inputs`` / ``Outputs`` (lists of ``{Name, Dimensions,
"Format/Datatype"}``), ``TacticName``, ``TacticValue``, ``Metadata``; that is the schema Polygraphy reads
(NVIDIA/TensorRT tools/Polygraphy/polygraphy/backend/trt/util.py). Without DETAILED the inspector lists names
only. TensorRT 11 splits ``Format/Datatype`` into two keys whose exact layer-level names were not found
(https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/api/migration/tensorrt-10x-to-11x-IEngineInspector.html),
so :func:`layer_datatypes` reads every format / data-type key it knows.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dfq_deploy.errors import DfqError
from dfq_deploy.trt.env import gpu_available, require_tensorrt, trt_logger

logger = logging.getLogger(__name__)

#: Keys of an I/O entry that may hold its format / data type (10.x: the first; 11.x: split, names unconfirmed).
DATATYPE_KEYS = ("Format/Datatype", "Format/DataType", "DataType", "Datatype", "Format")
# "Int8", "INT8", "Row major linear Int8 format", "Int4"; not UInt8 (an I/O type) nor Int32 / Int64
_INT_FORMAT = re.compile(r"(?<![a-z])int(?:8|4)(?!\d)", re.IGNORECASE)
# integer GEMM tactics are named like "sm80_xmma_gemm_i8i8_i8i32_f32_tn_n_..." or "..._int8_..."
_INT_TACTIC = re.compile(r"(?<![a-z0-9])(?:i8|int8)", re.IGNORECASE)


def engine_layers(engine: Any) -> list[dict[str, Any]]:
    """The per-layer dicts of the engine inspector's JSON (``LayerInformationFormat.JSON``).

    Args:
        engine: a ``tensorrt.ICudaEngine``, an engine file path, or serialised engine bytes.

    Raises:
        MissingDependencyError: TensorRT is not installed.
        DfqError: missing file, no GPU, an engine this TensorRT cannot deserialise, or unreadable JSON.
    """
    trt = require_tensorrt()
    runtime = None
    if isinstance(engine, str | Path | bytes | bytearray | memoryview):
        if isinstance(engine, str | Path):
            path = Path(engine)
            if not path.is_file():
                raise DfqError(f"engine file not found: {path} (build one with dfq-deploy build)")
            engine = path.read_bytes()
        ok, reason = gpu_available()
        if not ok:  # trt.Runtime without a driver raises or crashes the process
            raise DfqError(f"cannot inspect a TensorRT engine here: no usable NVIDIA GPU ({reason})")
        runtime = trt.Runtime(trt_logger())
        data = bytes(engine)
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise DfqError(f"TensorRT {trt.__version__} could not deserialise the engine: engines only run on the "
                           "TensorRT version and GPU they were built with; rebuild it with dfq-deploy build")
    inspector = engine.create_engine_inspector()
    try:
        # https://docs.nvidia.com/deeplearning/tensorrt/10.16.1/inference-library/engine-tools.html (10.x) and
        # https://docs.nvidia.com/deeplearning/tensorrt/11.4.0/_static/python-api/infer/Core/EngineInspector.html
        text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    finally:
        del inspector  # inspector before engine before runtime
        del engine
        del runtime
    return parse_engine_information(text)


def parse_engine_information(text: str) -> list[dict[str, Any]]:
    """The ``Layers`` of ``get_engine_information(JSON)`` as dicts (a names-only layer becomes ``{"Name": ...}``).

    Raises:
        DfqError: the text is not JSON or has no ``Layers`` list.
    """
    try:
        info = json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise DfqError(f"the engine inspector returned unreadable JSON ({exc}): inspect with trtexec "
                       "--profilingVerbosity=detailed --dumpLayerInfo instead") from exc
    layers = info.get("Layers") if isinstance(info, dict) else None
    if not isinstance(layers, list):
        raise DfqError("the engine inspector's JSON has no 'Layers' list: inspect with trtexec --dumpLayerInfo")
    out = [dict(layer) if isinstance(layer, dict) else {"Name": str(layer)} for layer in layers]
    if out and not any("LayerType" in layer for layer in out):
        logger.warning("the engine lists layer names only: it was built without ProfilingVerbosity.DETAILED; "
                       "rebuild it with dfq-deploy build for precisions and tactics")
    return out


def layer_datatypes(layer: dict[str, Any]) -> list[str]:
    """The format / data-type strings of a layer's inputs and outputs, e.g. ``["Row major linear Int8 format"]``."""
    found = []
    for key in ("Inputs", "Outputs"):
        for tensor in layer.get(key) or ():
            if isinstance(tensor, dict):
                found += [str(tensor[k]) for k in DATATYPE_KEYS if tensor.get(k)]
    return found


def _text(layer: dict[str, Any], *keys: str) -> str:
    return " ".join(str(layer.get(k) or "") for k in keys)


def integer_layers(layers: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Layers that run on integers: an Int8/Int4 input or output format, or an i8/int8 tactic name.

    The substrings come from TensorRT 10.x inspector output and kernel names as reported by NVIDIA and users;
    they cannot be checked without a GPU here, so an empty result means "not shown", not "not INT8". Myelin
    layers (tactics like ``__myl_...``) may not reveal their integer formats at all.
    """
    return [layer for layer in layers
            if any(_INT_FORMAT.search(d) for d in layer_datatypes(layer))
            or _INT_TACTIC.search(_text(layer, "TacticName"))]


def fused_attention_layers(layers: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Layers whose name or tactic mentions ``mha`` (any case), e.g. ``_gemm_mha_v2`` or ``fmha_...``.

    TensorRT 10.3 on Orin runs the fused kernel ``_gemm_mha_v2`` for FP16 attention (nsys, NVIDIA/TensorRT issue
    4167), and NVIDIA said a fused MHA shows ``_mha`` in kernel names (issue 3243). That these names reach the
    inspector's ``Name`` / ``TacticName`` is an assumption not checked here. INT8 MHA needs head size 16, 32 or 64
    and a sequence of at most 512 tokens (Developer Guide conditions as quoted in issue 4167).
    """
    return [layer for layer in layers if "mha" in _text(layer, "Name", "TacticName").lower()]


def layer_summary(layers: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Counts for logs and reports: layers, integer layers, fused attention layers, data types seen."""
    layers = list(layers)
    kinds: Counter[str] = Counter(d for layer in layers for d in layer_datatypes(layer))
    return {"layers": len(layers), "integer": len(integer_layers(layers)),
            "fused_attention": len(fused_attention_layers(layers)), "datatypes": dict(kinds.most_common())}
