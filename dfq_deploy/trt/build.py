"""Running the TensorRT builder for an :class:`~dfq_deploy.trt.plan.EnginePlan` (TensorRT >= 10.0 and a GPU).

Shared logger -> Builder -> network (strongly typed unless the plan calibrates) -> OnnxParser -> BuilderConfig
(workspace, DETAILED profiling verbosity, one optimisation profile per batch size plus the range, timing cache;
flags and calibrator on the implicit INT8 route only) -> serialised engine, written atomically with a
``<engine>.json`` description beside it: every profile, and the same build as ``trtexec`` and ``polygraphy`` lines
(:mod:`dfq_deploy.trt.commands`).
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from pathlib import Path
from typing import Any

from dfq_deploy.errors import DfqError
from dfq_deploy.trt.calibrator import (
    CalibrationBatcher,
    load_calib_images,
    make_int8_calibrator,
    read_cache,
    write_cache,
)
from dfq_deploy.trt.commands import nvidia_commands, shell_line, trtexec_command
from dfq_deploy.trt.env import gpu_available, gpu_info, require_tensorrt, trt_logger
from dfq_deploy.trt.formats import require_format
from dfq_deploy.trt.plan import EnginePlan, engine_metadata_path, qdq_route_message
from dfq_deploy.trt.planner import check_trt_version
from dfq_deploy.trt.profiles import describe_profiles
from dfq_deploy.utils import atomic_write_bytes, atomic_write_json, sha256_file

logger = logging.getLogger(__name__)

#: ``tensorrt.ProfilingVerbosity`` every build sets (recorded in the engine metadata), so the engine inspector
#: reports layer precisions and tactics (:func:`dfq_deploy.trt.inspector.engine_layers`).
PROFILING_VERBOSITY = "DETAILED"


def format_parser_error(err: Any) -> str:
    """One line for an ONNX parser error: operator, node name, description, error code.

    Reads the TensorRT 10 ``ParserError`` methods; a missing or failing one falls back to the node index.
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


def engine_metadata(plan: EnginePlan, trt_version: str, gpu: dict[str, Any], build_seconds: float,
                    onnx_sha256: str | None = None) -> dict[str, Any]:
    """The description written beside an engine (``model.engine.json``).

    ``profiles`` lists every optimisation profile by index (as :class:`~dfq_deploy.trt.engine.TRTEngine` selects
    them); ``trtexec``, ``trtexec_time`` and ``polygraphy`` give the same build, its timing and a comparison with
    ONNX Runtime in NVIDIA's tools (:func:`~dfq_deploy.trt.commands.nvidia_commands`).
    """
    import dfq_deploy

    return {
        "engine": plan.output,
        "tensorrt_version": trt_version,
        "gpu": gpu.get("name"),
        "compute_capability": gpu.get("compute_capability"),
        "precision": plan.precision,
        "graph_dtype": plan.graph_dtype,
        "graph_quant": plan.graph_quant,
        "strongly_typed": plan.strongly_typed,
        "builder_flags": list(plan.builder_flags),
        "profiling_verbosity": PROFILING_VERBOSITY,
        "profiles": [{"index": i, **p.to_dict()} for i, p in enumerate(plan.profiles)],
        "batch_sizes": list(plan.batch_sizes),
        **nvidia_commands(plan),
        "build_seconds": round(float(build_seconds), 3),
        "onnx_sha256": onnx_sha256,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dfq_deploy": dfq_deploy.__version__,
        "plan": plan.to_dict(),
    }


def _parse(trt: Any, builder: Any, plan: EnginePlan, version: str, log: logging.Logger) -> tuple[Any, Any]:
    """The parsed network and its parser (which must outlive the network's use)."""
    # STRONGLY_TYPED is valid on 10.x and accepted but ignored on 11.x, where every network is strongly typed (its
    # integer value changed from 1 to 0 in 11.x, so the flag is always taken from the enum, never hard-coded);
    # EXPLICIT_BATCH is gone in 11 and never referenced (https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/
    # _static/python-api/infer/Core/Builder.html). 0: the weakly typed calibrator network, TensorRT 10.x only.
    creation = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(creation)
    parser = trt.OnnxParser(network, trt_logger())
    onnx_path = Path(plan.onnx)
    log.info("parsing %s (TensorRT %s, %s network)", onnx_path, version,
             "strongly typed" if plan.strongly_typed else "weakly typed")
    if not parser.parse_from_file(str(onnx_path)):
        errors = [format_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        for e in errors:
            log.error("ONNX parser: %s", e)
        first = errors[0] if errors else "unknown error"
        more = f" (+{len(errors) - 1} more, see the log)" if len(errors) > 1 else ""
        raise DfqError(f"TensorRT {version} could not parse {onnx_path}: {first}{more}")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if plan.input_name not in names:
        raise DfqError(f"the network has inputs {names}, the plan profiles '{plan.input_name}': "
                       "plan the build again")
    return network, parser


def _configure(trt: Any, builder: Any, plan: EnginePlan, version: str, log: logging.Logger) -> tuple[Any, Any]:
    """The builder config and its timing cache (None without ``plan.timing_cache``)."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_mb << 20)
    # DETAILED: "layer names and layer parameters" for the engine inspector (default LAYER_NAMES_ONLY),
    # https://docs.nvidia.com/deeplearning/tensorrt/api/python_api/infer/Core/BuilderConfig.html
    config.profiling_verbosity = getattr(trt.ProfilingVerbosity, PROFILING_VERBOSITY)
    # Only the calibrator route has flags: FP16/INT8 on a strongly typed network fail the build (10.x) and do
    # not exist in 11.x (https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/
    # tensorrt-10x-to-11x-python-api-reference.html).
    for name in plan.builder_flags:
        member = getattr(trt.BuilderFlag, name, None)
        if member is None:
            raise DfqError(qdq_route_message(version))
        config.set_flag(member)
    # One profile per batch size (min = opt = max) and the range last. add_optimization_profile returns the
    # profile's index, -1 when it is invalid (IBuilderConfig, 10.3 and 11.1 bindings and docstrings); the engine
    # numbers its profiles in this order, which TRTEngine reads back with get_tensor_profile_shape(name, index).
    for i, p in enumerate(plan.profiles):
        prof = builder.create_optimization_profile()
        _set_shape(prof, p.input_name, p.min, p.opt, p.max)
        index = config.add_optimization_profile(prof)
        if index != i:
            raise DfqError(f"TensorRT rejected optimisation profile {i} {p.to_dict()} (got index {index}): plan "
                           "the build again")

    timing_cache = None
    if plan.timing_cache:
        data = read_cache(plan.timing_cache) or b""
        timing_cache = _load_timing_cache(config, data)
        if timing_cache is None:
            log.warning("timing cache %s does not match this TensorRT/GPU: starting a new one", plan.timing_cache)
            timing_cache = _load_timing_cache(config, b"")
        log.info("timing cache %s (%s)", plan.timing_cache, f"{len(data)} bytes" if data else "new")
    return config, timing_cache


def _load_timing_cache(config: Any, data: bytes) -> Any:
    """A timing cache made from ``data`` and set on ``config``, or None when TensorRT refuses it.

    ``create_timing_cache`` may fail (None, or an exception in the bindings) on a corrupt or foreign cache, as
    NVIDIA's ``samples/utils/timingCache.cpp`` and Polygraphy guard against; ``set_timing_cache(cache,
    ignore_mismatch=False)`` returns False on a mismatch.
    """
    try:
        cache = config.create_timing_cache(data)
        return cache if cache is not None and config.set_timing_cache(cache, False) else None
    except (RuntimeError, TypeError):
        if not data:
            raise
        return None


def _set_shape(profile: Any, name: str, *shapes: tuple[int, ...]) -> None:
    """``profile.set_shape`` with TensorRT's error (a RuntimeError on inconsistent shapes) as one line."""
    try:
        profile.set_shape(name, *shapes)
    except RuntimeError as exc:
        raise DfqError(f"TensorRT rejected the shapes {list(shapes)} of '{name}' ({exc}): plan the build "
                       "again") from exc


def build_engine(plan: EnginePlan, log: logging.Logger | None = None) -> Path:
    """Build and write the TensorRT engine described by ``plan``.

    Steps: check TensorRT version and GPU -> Builder (the shared :func:`~dfq_deploy.trt.env.trt_logger`) ->
    network (strongly typed unless the plan calibrates) -> parse the ONNX (every parser error logged with its
    node) -> BuilderConfig (workspace, DETAILED profiling verbosity, the plan's profiles in order, timing cache;
    flags and calibrator on the implicit INT8 route) -> ``build_serialized_network`` -> engine written
    atomically, timing cache saved, ``<engine>.json``.

    Args:
        plan: from :func:`plan_build`.
        log: logger for progress messages (default: this module's); TensorRT's own messages go to the
            ``dfq_deploy.trt`` logger.

    Returns:
        Path of the engine.

    Raises:
        MissingDependencyError: TensorRT or cuda-python is not installed.
        DfqError: no GPU, an unsupported TensorRT, parser errors, or a failed build (nothing is written).
    """
    log = log or logger
    trt = require_tensorrt()
    version = str(getattr(trt, "__version__", "0"))
    check_trt_version(version, plan)
    ok, reason = gpu_available()
    if not ok:
        raise DfqError(f"cannot build a TensorRT engine here: no usable NVIDIA GPU ({reason})")
    require_format(plan.graph_quant, gpu_info())  # FP8: compute capability >= 8.9; NVFP4: >= 10.0
    onnx_path = Path(plan.onnx)
    if not onnx_path.is_file():
        raise DfqError(f"ONNX file not found: {onnx_path}")

    builder = trt.Builder(trt_logger())
    # the parser stays referenced until the build returns: the network may use weights the parser holds
    network, parser = _parse(trt, builder, plan, version, log)
    config, timing_cache = _configure(trt, builder, plan, version, log)
    calib = None
    try:
        if plan.calibrator is not None:
            cs = plan.calibrator
            images = load_calib_images(cs.calib_from, plan.image_shape)
            batcher = CalibrationBatcher(images, cs.batch_size)
            calib = make_int8_calibrator(batcher, cs.cache_file)
            config.int8_calibrator = calib  # TensorRT 10.x only (deprecated in 10.1, removed in 11)
            cprof = builder.create_optimization_profile()
            cshape = batcher.shape
            _set_shape(cprof, plan.input_name, cshape, cshape, cshape)
            config.set_calibration_profile(cprof)
            log.info("implicit INT8 calibration on %d x %d images from %s", batcher.num_batches,
                     batcher.batch_size, cs.calib_from)

        log.info("building %s engine (%s graph, workspace %d MB, %d profiles: %s); this can take minutes",
                 plan.precision, plan.graph_dtype.upper(), plan.workspace_mb, len(plan.profiles),
                 describe_profiles(plan.batch_table))
        log.info("the same build with trtexec: %s", shell_line(trtexec_command(plan)))
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
    meta = engine_metadata(plan, version, gpu_info(), build_s, sha256_file(onnx_path))
    atomic_write_json(engine_metadata_path(out), meta)
    log.info("wrote %s (%.2f MB) in %.1f s", out, out.stat().st_size / 1e6, build_s)
    return out
