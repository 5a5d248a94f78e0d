"""Latency and throughput of deployed artifacts (ONNX in ONNX Runtime CPU, TensorRT engines).

Protocol of :func:`run_benchmark`, per batch size:

1. every artifact is loaded once and warmed up with ``warmup`` runs;
2. the timed runs are split into ``rounds`` segments per artifact and run interleaved, ``A B A B ...``, so
   that drift (thermal throttling, clock changes, a neighbour's load) touches every artifact alike;
3. each run is timed on its own with :func:`time.perf_counter`; the statistics are over all of an artifact's
   runs (:func:`summarize`), and the first artifact is the baseline the others' ratios refer to;
4. when a power sampler is given it runs over the whole timed part, and each artifact's energy is the
   integral over its own segments (see :mod:`dfq_deploy.bench.power`).

Inputs are random float32 (or the graph's float type) of the model's input shape, with the batch
dimension set; the same array is reused for every run of one artifact and batch size.

For an ONNX file the session runs with all graph optimizations on (what a deployment gets) and saves the
optimized graph, whose op-type histogram shows which kernels ORT really runs: integer kernels such as
``MatMulIntegerToFloat``, ``QLinearMatMul``, ``QGemm`` or ``MatMulNBits`` mean the QDQ pairs were fused;
``DequantizeLinear`` feeding a float ``MatMul`` means they were not.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dfq_deploy.errors import DfqError

logger = logging.getLogger(__name__)

SCHEMA = "dfq_deploy.bench/1"

ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")

#: Op types that mean ORT runs integer (or packed low-bit) kernels rather than dequantize-then-float.
INTEGER_KERNELS = (
    "MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul", "QGemm", "QLinearConv", "ConvInteger",
    "MatMulNBits", "DynamicQuantizeMatMul", "QAttention", "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul",
    "QLinearSoftmax", "QLinearGlobalAveragePool", "QLinearConcat",
)

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


# ----------------------------------------------------------------------------------------------------------
# Statistics and timing
# ----------------------------------------------------------------------------------------------------------


def summarize(samples_s: Sequence[float], batch: int = 1) -> dict[str, Any]:
    """Statistics of per-run latencies.

    Percentiles use linear interpolation between order statistics (numpy's default, "type 7"); ``std`` is
    the sample standard deviation (ddof=1, 0 for a single run); throughput is ``batch / mean``.

    Args:
        samples_s: one latency per run, in seconds.
        batch: images per run.

    Returns:
        ``n``, ``mean_ms``, ``p50_ms``, ``p90_ms``, ``p99_ms``, ``std_ms``, ``min_ms``, ``max_ms``,
        ``batch``, ``throughput_ips`` (images per second) and ``latency_per_image_ms`` (p50 / batch).

    Raises:
        ValueError: no samples.
    """
    x = np.asarray(samples_s, dtype=np.float64) * 1e3
    if x.size == 0:
        raise ValueError("no latency samples to summarize")
    mean = float(x.mean())
    p50, p90, p99 = (float(v) for v in np.percentile(x, [50, 90, 99]))
    return {
        "n": int(x.size),
        "mean_ms": mean,
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "std_ms": float(x.std(ddof=1)) if x.size > 1 else 0.0,
        "min_ms": float(x.min()),
        "max_ms": float(x.max()),
        "batch": int(batch),
        "throughput_ips": batch / (mean / 1e3) if mean > 0 else float("inf"),
        "latency_per_image_ms": p50 / batch,
    }


def _validate_budget(iters: int | None, seconds: float | None) -> None:
    if iters is not None and seconds is not None:
        raise DfqError("give either --iters or --seconds, not both")
    if iters is not None and iters < 1:
        raise DfqError(f"--iters must be at least 1, got {iters}")
    if seconds is not None and seconds <= 0:
        raise DfqError(f"--seconds must be positive, got {seconds}")


def timed_runs(fn: Callable[[], Any], iters: int | None = None, seconds: float | None = None,
               on_run: Callable[[], None] | None = None) -> tuple[list[float], float, float]:
    """Call ``fn`` ``iters`` times, or until ``seconds`` have passed (at least once), timing each call.

    Returns:
        ``(latencies in s, wall-clock start, wall-clock end)``; the wall-clock times (:func:`time.time`)
        delimit the segment for the power samplers.
    """
    if iters is None and seconds is None:
        raise ValueError("timed_runs needs iters or seconds")
    samples: list[float] = []
    wall0 = time.time()
    clock = time.perf_counter
    if iters is not None:
        for _ in range(iters):
            t = clock()
            fn()
            samples.append(clock() - t)
            if on_run is not None:
                on_run()
    else:
        assert seconds is not None
        end = clock() + seconds
        while True:
            t = clock()
            fn()
            now = clock()
            samples.append(now - t)
            if on_run is not None:
                on_run()
            if now >= end:
                break
    return samples, wall0, time.time()


def time_loop(fn: Callable[[], Any], warmup: int = 10, iters: int | None = None,
              seconds: float | None = None) -> list[float]:
    """Warm up ``warmup`` times, then time ``fn`` for ``iters`` runs or ``seconds`` (one artifact).

    Returns:
        per-run latencies in seconds.

    Raises:
        DfqError: both or neither budget given, or a bad value.
    """
    if iters is None and seconds is None:
        iters = 100
    _validate_budget(iters, seconds)
    for _ in range(max(0, warmup)):
        fn()
    return timed_runs(fn, iters, seconds)[0]


def split_budget(iters: int, rounds: int) -> list[int]:
    """``iters`` split into ``min(rounds, iters)`` chunks that differ by at most one, larger first."""
    rounds = max(1, min(rounds, iters))
    base, extra = divmod(iters, rounds)
    return [base + (1 if r < extra else 0) for r in range(rounds)]


# ----------------------------------------------------------------------------------------------------------
# Runners
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Runner:
    """One loaded artifact: ``prepare(batch)`` makes its input, ``run()`` runs it once."""

    path: Path
    name: str
    info: dict[str, Any] = field(default_factory=dict)

    input_shape: list[Any] = field(default_factory=list)

    def check(self, batch: int) -> str | None:
        """Why ``batch`` cannot run on this artifact, or ``None``."""
        return _batch_shape(self.input_shape, batch, self.name)[1]

    def prepare(self, batch: int) -> None:
        """Build the (random) input for ``batch``."""
        raise NotImplementedError

    def run(self) -> Any:
        raise NotImplementedError

    def after_run(self) -> None:
        """Collect per-run extras (TensorRT timings)."""

    def begin_timed(self) -> None:
        """Called once per batch size between the warm-up and the timed runs."""

    def batch_info(self) -> dict[str, Any]:
        """What the runtime did for the batch size just timed (TensorRT: profile, CUDA graph replays)."""
        return {}

    def extras(self) -> dict[str, list[float]]:
        """Per-run extra series collected since the last :meth:`prepare` (seconds)."""
        return {}

    def close(self) -> None:
        """Release resources."""


def _batch_shape(shape: Sequence[Any], batch: int, what: str) -> tuple[tuple[int, ...] | None, str | None]:
    """Input shape with the leading (batch) dimension set; ``(None, reason)`` when it is fixed otherwise."""
    if not shape:
        return None, f"{what} has a scalar input"
    dims: list[int] = []
    for i, d in enumerate(shape):
        fixed = isinstance(d, (int, np.integer)) and int(d) > 0
        if i == 0:
            if fixed and int(d) != batch:
                return None, f"{what} has a fixed batch dimension {int(d)}"
            dims.append(batch)
        elif fixed:
            dims.append(int(d))
        else:
            return None, f"{what} has a dynamic non-batch dimension ({d!r}) at position {i}"
    return tuple(dims), None


def op_histogram(model_path: str | Path) -> dict[str, int]:
    """Op-type counts of an ONNX graph, subgraphs included; ops outside the default domain are
    keyed ``domain:op`` only when the plain name would be ambiguous (keys are plain op types otherwise)."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    counts: dict[str, int] = {}

    def walk(graph: Any) -> None:
        for node in graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        walk(g)

    walk(proto.graph)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def kernel_summary(histogram: dict[str, int]) -> dict[str, Any]:
    """What the optimized graph's op types say about quantization.

    Returns:
        ``integer_kernels`` (counts of the :data:`INTEGER_KERNELS` present), ``dequantize_linear`` and
        ``quantize_linear`` left in the graph, ``float_matmul`` (``MatMul`` + ``Gemm`` + ``FusedMatMul``)
        and ``qdq_fused``: ``True`` when integer kernels run and no ``DequantizeLinear`` is left,
        ``False`` when ``DequantizeLinear`` remains and no integer kernel runs, ``"partial"`` when both,
        ``None`` for a graph without quantization ops.
    """
    integer = {k: v for k, v in histogram.items() if k in INTEGER_KERNELS}
    dq = histogram.get("DequantizeLinear", 0)
    q = histogram.get("QuantizeLinear", 0)
    float_mm = sum(histogram.get(k, 0) for k in ("MatMul", "Gemm", "FusedMatMul"))
    if integer and not dq:
        fused: bool | str | None = True
    elif integer and dq:
        fused = "partial"
    elif dq or q:
        fused = False
    else:
        fused = None
    return {"integer_kernels": integer, "dequantize_linear": dq, "quantize_linear": q,
            "float_matmul": float_mm, "qdq_fused": fused}


class OrtRunner(Runner):
    """An ONNX file in an ONNX Runtime CPU session (all graph optimizations on)."""

    def __init__(self, path: Path, name: str, threads: int | None = None, seed: int = 0) -> None:
        super().__init__(path, name)
        import onnxruntime as ort

        from dfq_deploy.export.ort import ort_session

        self._tmp = Path(tempfile.mkdtemp(prefix="dfq-bench-ort-"))
        optimized = self._tmp / "optimized.onnx"
        try:  # the one session factory: all optimizations, sequential, what a user deploys
            self.session = ort_session(path, threads=threads, optimized_path=optimized)
        except DfqError:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        inp = self.session.get_inputs()[0]
        if len(self.session.get_inputs()) != 1:
            logger.warning("%s has %d inputs; only the first (%s) is fed, the benchmark may fail",
                           path, len(self.session.get_inputs()), inp.name)
        self.input_name = inp.name
        self.input_shape = list(inp.shape)
        self.dtype = _ORT_DTYPES.get(inp.type, np.float32)
        self._rng = np.random.default_rng(seed)
        self._x: np.ndarray | None = None
        self.info = {
            "runtime": "onnxruntime",
            "onnxruntime": ort.__version__,
            "provider": self.session.get_providers()[0],
            "graph_optimization": "ORT_ENABLE_ALL",
            "intra_op_threads": threads or "default",
            "input": {"name": inp.name, "shape": [d if isinstance(d, int) else str(d) for d in inp.shape],
                      "type": inp.type},
        }
        try:
            hist = op_histogram(optimized)
            self.info["kernels"] = {"optimized_graph_ops": hist, **kernel_summary(hist)}
        except Exception as exc:  # an unreadable optimized graph must not stop the benchmark
            logger.warning("could not read ORT's optimized graph for %s: %s", path, exc)
            self.info["kernels"] = {"error": str(exc)}

    def prepare(self, batch: int) -> None:
        shape, reason = _batch_shape(self.input_shape, batch, self.name)
        if shape is None:
            raise DfqError(f"cannot run batch {batch}: {reason}")
        self._x = self._rng.standard_normal(shape, dtype=np.float32).astype(self.dtype, copy=False)

    def run(self) -> Any:
        return self.session.run(None, {self.input_name: self._x})

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


class TRTRunner(Runner):
    """A serialized TensorRT engine through :class:`dfq_deploy.trt.engine.TRTEngine`.

    Uses ``TRTEngine(path, keep_timings=False, cuda_graphs=...)``, its ``input_shape`` (``-1`` for dynamic
    dimensions), ``input_dtype``, ``profiles`` and ``profile_for(batch)`` (each batch runs on the optimisation
    profile tuned for it; engines without them: ``batch_range``), ``infer(x)`` (one batch including the
    host/device copies: the host-side latency), ``graph_calls``, and after each call ``timings``: the last call's
    phases in milliseconds (``h2d_ms``, ``compute_ms``, ``d2h_ms``; keys ending in ``_s`` are read as seconds).
    ``compute`` is the GPU compute time apart from the copies.

    CUDA graphs are on by default: the engine replays a graph once a batch shape repeats (after the warm-up), so
    batch-1 latency measures the engine rather than the launch of each kernel; ``cuda_graphs=False`` (``bench
    --no-cuda-graphs``) times plain enqueues. Each timed batch records its profile and how many timed runs
    replayed a graph (``trt`` in the batch's entry).
    """

    def __init__(self, path: Path, name: str, seed: int = 0, cuda_graphs: bool = True) -> None:
        super().__init__(path, name)
        try:
            from dfq_deploy.trt.engine import TRTEngine
        except ImportError as exc:
            raise DfqError(f"TensorRT runtime is not available ({exc}): install the trt extra "
                           "(pip install 'dfq-deploy[trt]') on a machine with an NVIDIA GPU") from exc
        self.cuda_graphs = bool(cuda_graphs)
        try:
            self.engine = TRTEngine(path, keep_timings=False, cuda_graphs=self.cuda_graphs)
        except TypeError:  # an engine class without the keywords
            self.engine = TRTEngine(path)
        shape = getattr(self.engine, "input_shape", None)
        if shape is None and getattr(self.engine, "inputs", None):
            shape = getattr(self.engine.inputs[0], "shape", None)
        if shape is None:
            raise DfqError(f"cannot read the input shape of {path} from TRTEngine: update dfq_deploy.trt.engine")
        self.input_shape = [int(d) if isinstance(d, (int, np.integer)) and d > 0 else None for d in shape]
        self.dtype = np.dtype(getattr(self.engine, "input_dtype", np.float32))
        batch_range = getattr(self.engine, "batch_range", None)
        self.batch_range = tuple(int(b) for b in batch_range) if batch_range else None
        self._rng = np.random.default_rng(seed)
        self._x: np.ndarray | None = None
        self._extras: dict[str, list[float]] = {}
        infer = getattr(self.engine, "infer", None)
        self._infer = infer if callable(infer) else self.engine
        self.info = {"runtime": "tensorrt", "input": {"shape": [d if d else -1 for d in self.input_shape],
                                                      "dtype": str(self.dtype)}, "cuda_graphs": self.cuda_graphs}
        if self.batch_range:
            self.info["batch_profile"] = list(self.batch_range)
        profiles = getattr(self.engine, "profiles", None)
        self.profiles = [tuple(int(b) for b in p) for p in profiles] if profiles else None
        if self.profiles:
            self.info["profiles"] = [list(p) for p in self.profiles]
        self._batch = 0
        self._graph_calls0 = 0
        for key in ("tensorrt_version", "device_name", "precision"):
            value = getattr(self.engine, key, None)
            if value is not None:
                self.info[key] = value

    def check(self, batch: int) -> str | None:
        reason = super().check(batch)
        if reason is not None:
            return reason
        if self.profiles:
            from dfq_deploy.trt.profiles import choose_profile

            try:
                choose_profile(self.profiles, batch)
            except DfqError as exc:
                return f"{self.name}: {exc}"
        elif self.batch_range and not self.batch_range[0] <= batch <= self.batch_range[2]:
            lo, _, hi = self.batch_range
            return f"{self.name}'s optimisation profile covers batch {lo}..{hi}"
        return None

    def prepare(self, batch: int) -> None:
        shape, reason = _batch_shape(self.input_shape, batch, self.name)
        if shape is None:
            raise DfqError(f"cannot run batch {batch}: {reason}")
        self._x = self._rng.standard_normal(shape, dtype=np.float32).astype(self.dtype, copy=False)
        self._extras = {}
        self._batch = batch

    def run(self) -> Any:
        return self._infer(self._x)

    def begin_timed(self) -> None:
        self._graph_calls0 = int(getattr(self.engine, "graph_calls", 0) or 0)

    def batch_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"cuda_graphs": self.cuda_graphs,
                                "graph_replays": int(getattr(self.engine, "graph_calls", 0) or 0) - self._graph_calls0}
        if self.profiles:
            from dfq_deploy.trt.profiles import choose_profile

            index = choose_profile(self.profiles, self._batch)
            info.update(profile=index, profile_batch=list(self.profiles[index]))
        errors = getattr(self.engine, "graph_errors", None)
        if errors:
            info["graph_errors"] = list(errors)
        return info

    def after_run(self) -> None:
        timings = getattr(self.engine, "timings", None)
        if not timings:
            return
        for key, value in dict(timings).items():
            if value is None:
                continue
            if key.endswith("_ms"):
                name, seconds = key[:-3], float(value) / 1e3
            elif key.endswith("_s"):
                name, seconds = key[:-2], float(value)
            else:
                continue
            self._extras.setdefault(name, []).append(seconds)

    def extras(self) -> dict[str, list[float]]:
        return self._extras

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if callable(close):
            close()


def _names(paths: Sequence[Path]) -> list[str]:
    """Short unique labels: the file stem, or the folder name for ``<folder>/model.onnx``."""
    raw = [p.parent.name if p.stem in ("model", "engine") and p.parent.name else p.stem for p in paths]
    out = []
    for i, n in enumerate(raw):
        out.append(n if raw.count(n) == 1 else f"{n}#{i + 1}")
    return out


def _check_artifacts(artifacts: Sequence[str | Path], runtime: str) -> list[Path]:
    if runtime not in ("ort", "trt"):
        raise DfqError(f"unknown runtime {runtime!r}: use --runtime ort or --runtime trt")
    if not artifacts:
        raise DfqError("no artifact to benchmark: pass at least one .onnx (ort) or .engine/.plan (trt) file")
    paths = [Path(a) for a in artifacts]
    for p in paths:
        if not p.is_file():
            raise DfqError(f"artifact not found: {p}")
        suffix = p.suffix.lower()
        if runtime == "ort" and suffix not in ONNX_SUFFIXES:
            raise DfqError(f"{p} is not an .onnx file: ONNX Runtime benchmarks ONNX graphs "
                           "(use --runtime trt for TensorRT engines)")
        if runtime == "trt" and suffix in ONNX_SUFFIXES:
            raise DfqError(f"{p} is an ONNX graph: build a TensorRT engine from it first, "
                           "or benchmark it with --runtime ort")
    return paths


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _vs_baseline(entry: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    lat, blat = entry["latency"], base["latency"]
    out = {
        "p50_ratio": _ratio(lat["p50_ms"], blat["p50_ms"]),
        "mean_ratio": _ratio(lat["mean_ms"], blat["mean_ms"]),
        "p99_ratio": _ratio(lat["p99_ms"], blat["p99_ms"]),
        "speedup_p50": _ratio(blat["p50_ms"], lat["p50_ms"]),
        "throughput_ratio": _ratio(lat["throughput_ips"], blat["throughput_ips"]),
    }
    e, be = entry.get("energy") or {}, base.get("energy") or {}
    if e.get("available") and be.get("available"):
        out["energy_per_image_ratio"] = _ratio(e.get("joules_per_image"), be.get("joules_per_image"))
    return out


def run_benchmark(
    artifacts: Sequence[str | Path],
    runtime: str = "ort",
    batches: Sequence[int] = (1, 8, 32),
    warmup: int = 10,
    iters: int | None = None,
    seconds: float | None = None,
    threads: int | None = None,
    progress: bool = True,
    power_sampler: Any = None,
    rounds: int = 5,
    seed: int = 0,
    cuda_graphs: bool = True,
) -> dict[str, Any]:
    """Benchmark artifacts interleaved, per batch size, against the first one.

    Args:
        artifacts: ``.onnx`` files (``runtime="ort"``) or TensorRT engines (``runtime="trt"``); the first is
            the baseline.
        runtime: ``"ort"`` (ONNX Runtime CPU) or ``"trt"`` (:class:`dfq_deploy.trt.engine.TRTEngine`).
        batches: batch sizes; one the graph cannot take (fixed batch dimension) is skipped with a reason.
        warmup: untimed runs per artifact and batch size.
        iters: timed runs per artifact and batch size (default 100 when neither budget is given).
        seconds: timed seconds per artifact and batch size instead of ``iters``.
        threads: ONNX Runtime intra-op threads (``None``: ORT's default, one per physical core).
        progress: show a tqdm bar.
        power_sampler: a :class:`dfq_deploy.bench.power.PowerSampler` (or ``None``: energy not measured).
        rounds: interleaving rounds: each artifact's budget is split into this many segments.
        seed: seed of the random inputs.
        cuda_graphs: TensorRT engines replay CUDA graphs (:class:`TRTRunner`); recorded in ``config`` and in each
            TensorRT batch entry's ``trt`` (with the profile and the timed runs that replayed a graph).

    Returns:
        ``schema``, ``runtime``, ``config``, ``artifacts`` (each with ``name``, ``path``, ``baseline``,
        ``info`` (for ONNX: ``kernels``, the optimized graph's op histogram) and ``batches``: a list of
        ``{"batch", "latency": summarize(...), "samples_s", "energy", "vs_baseline", "gpu_timings"}`` or
        ``{"batch", "skipped": reason}``), ``power`` (the sampler's description), ``schedule`` (the run
        order: ``{"batch", "round", "artifact", "iters", "t0", "t1"}``) and timing of the whole run.

    Raises:
        DfqError: bad arguments, a missing artifact, or one the runtime cannot load.
    """
    paths = _check_artifacts(artifacts, runtime)
    batches = list(dict.fromkeys(int(b) for b in batches))
    if not batches or any(b < 1 for b in batches):
        raise DfqError(f"batch sizes must be positive integers, got {batches}")
    if warmup < 0:
        raise DfqError(f"--warmup must be 0 or more, got {warmup}")
    if iters is None and seconds is None:
        iters = 100
    _validate_budget(iters, seconds)
    rounds = max(1, int(rounds))
    if iters is not None:
        rounds = min(rounds, iters)

    names = _names(paths)
    runners: list[Runner] = []
    try:
        for p, n in zip(paths, names, strict=True):
            logger.info("loading %s", p)
            runners.append(OrtRunner(p, n, threads, seed) if runtime == "ort" else TRTRunner(p, n, seed, cuda_graphs))
        result = _run(runners, runtime, batches, warmup, iters, seconds, threads, progress, power_sampler,
                      rounds, seed)
        result["config"]["cuda_graphs"] = cuda_graphs if runtime == "trt" else None
        return result
    finally:
        for r in runners:
            r.close()


def _run(runners: list[Runner], runtime: str, batches: list[int], warmup: int, iters: int | None,
         seconds: float | None, threads: int | None, progress: bool, sampler: Any, rounds: int,
         seed: int) -> dict[str, Any]:
    started = time.time()
    per_round_iters = split_budget(iters, rounds) if iters is not None else None
    per_round_s = seconds / rounds if seconds is not None else None
    results: list[list[dict[str, Any]]] = [[] for _ in runners]
    schedule: list[dict[str, Any]] = []

    runnable: dict[int, list[int]] = {}
    for b in batches:
        runnable[b] = []
        for i, r in enumerate(runners):
            reason = r.check(b)
            if reason is None:
                runnable[b].append(i)
            else:
                logger.warning("skipping batch %d for %s: %s", b, r.name, reason)
                results[i].append({"batch": b, "skipped": reason})
    total_units = sum(len(v) for v in runnable.values()) * rounds
    bar = tqdm(total=total_units, desc="bench", unit="seg", disable=not progress, leave=False)

    if sampler is not None:
        sampler.start()
    try:
        for b in batches:
            active = runnable[b]
            if not active:
                continue
            samples: dict[int, list[float]] = {i: [] for i in active}
            segments: dict[int, list[tuple[float, float]]] = {i: [] for i in active}
            extras: dict[int, dict[str, list[float]]] = {i: {} for i in active}
            for i in active:
                r = runners[i]
                r.prepare(b)
                bar.set_postfix_str(f"warm-up {r.name} b={b}")
                for _ in range(warmup):
                    r.run()
                r.begin_timed()
            for rnd in range(rounds):
                for i in active:
                    r = runners[i]
                    bar.set_postfix_str(f"{r.name} b={b} round {rnd + 1}/{rounds}")
                    n = per_round_iters[rnd] if per_round_iters is not None else None
                    s, t0, t1 = timed_runs(r.run, n, per_round_s, on_run=r.after_run)
                    samples[i].extend(s)
                    segments[i].append((t0, t1))
                    for k, v in r.extras().items():
                        extras[i].setdefault(k, []).extend(v)
                    r.extras().clear()
                    schedule.append({"batch": b, "round": rnd, "artifact": i, "name": r.name, "iters": len(s),
                                     "t0": t0, "t1": t1})
                    bar.update(1)
            for i in active:
                entry: dict[str, Any] = {"batch": b, "latency": summarize(samples[i], b),
                                         "samples_s": samples[i], "segments": segments[i]}
                if extras[i]:
                    entry["gpu_timings"] = {k: summarize(v, b) for k, v in extras[i].items()}
                runtime_info = runners[i].batch_info()
                if runtime_info:
                    entry[runtime] = runtime_info  # "trt": profile, CUDA graph replays
                results[i].append(entry)
    finally:
        if sampler is not None:
            sampler.stop()
        bar.close()

    for entries in results:
        entries.sort(key=lambda e: batches.index(e["batch"]))

    # Energy once the sampler has stopped (its last reading brackets the final segment).
    for i in range(len(runners)):
        for entry in results[i]:
            if "skipped" in entry:
                continue
            images = entry["batch"] * entry["latency"]["n"]
            if sampler is None:
                entry["energy"] = {"available": False, "reason": "no power sampler was given"}
            else:
                entry["energy"] = sampler.energy(entry["segments"], images)

    base = {e["batch"]: e for e in results[0] if "skipped" not in e}
    for i in range(1, len(runners)):
        for entry in results[i]:
            if "skipped" not in entry and entry["batch"] in base:
                entry["vs_baseline"] = _vs_baseline(entry, base[entry["batch"]])

    if sampler is None:
        power: dict[str, Any] = {"available": False, "reason": "no power sampler was given"}
    else:
        power = sampler.describe()
        if power.get("available") and callable(getattr(sampler, "trace", None)):
            power["trace"] = sampler.trace()
    return {
        "schema": SCHEMA,
        "runtime": runtime,
        "config": {"batches": batches, "warmup": warmup, "iters": iters, "seconds": seconds,
                   "threads": threads, "rounds": rounds, "seed": seed, "interleaved": True,
                   "timer": "time.perf_counter"},
        "artifacts": [
            {"name": r.name, "path": str(r.path), "baseline": i == 0, "info": r.info, "batches": results[i]}
            for i, r in enumerate(runners)
        ],
        "power": power,
        "schedule": schedule,
        "started_at": started,
        "wall_s": time.time() - started,
    }
