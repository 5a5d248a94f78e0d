"""Running a TensorRT engine from an app: :class:`TRTEngine`.

:class:`TRTEngine` deserialises an engine once per process and serves it to any number of threads: each
concurrent call borrows an execution context of its own with its own CUDA stream, events and pinned buffers
(:class:`~dfq_deploy.trt.context.ExecSlot`, from a :class:`~dfq_deploy.trt.pool.SlotPool`), which is
TensorRT's rule for threads. Each call runs on the optimisation profile tuned for its batch
(:func:`~dfq_deploy.trt.profiles.choose_profile`), on a context already on that profile where one is free. With
``cuda_graphs=True`` a context replays a CUDA graph of the engine for batches of a repeated shape. Before
deserialising, the engine's build record is checked against this TensorRT and GPU (:mod:`dfq_deploy.trt.compat`),
so a foreign engine is refused with one line instead of a TensorRT error.

Every call records CUDA events around the host-to-device copy, the engine and the device-to-host copy, so
benchmarks can separate GPU compute time from copy time (:attr:`TRTEngine.timings` for the calling thread's last
call, :attr:`TRTEngine.timing_history` and :func:`~dfq_deploy.trt.timing.summarize_timings` over many).

TensorRT is imported only when an engine is opened; importing this module needs neither TensorRT nor a GPU.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dfq_deploy.errors import DfqError
from dfq_deploy.trt.compat import check_engine_compat
from dfq_deploy.trt.context import ExecSlot, TensorInfo
from dfq_deploy.trt.cuda import CudaPython, PyCuda, cuda_backend
from dfq_deploy.trt.env import gpu_available, gpu_info, require_tensorrt, trt_logger
from dfq_deploy.trt.feed import check_feed, profile_table, torch_dtype
from dfq_deploy.trt.formats import require_format
from dfq_deploy.trt.plan import engine_metadata_path
from dfq_deploy.trt.pool import SlotPool
from dfq_deploy.trt.profiles import BatchProfile, batch_envelope, choose_profile, describe_profiles
from dfq_deploy.trt.timing import InferTiming

logger = logging.getLogger(__name__)

__all__ = ["TRTEngine", "TensorInfo"]


class TRTEngine:
    """A deserialised TensorRT engine, shared safely by the threads of one process; use it as a context manager.

    Example::

        with TRTEngine("model.engine", cuda_graphs=True) as eng:
            logits = eng.infer(images)            # numpy [N, C, H, W] float32 -> numpy logits
            eng.timings                           # this thread's last call: {"h2d_ms", "compute_ms", "d2h_ms"}
            print(summarize_timings(eng.timing_history, skip=1))

        # a server: one engine, many threads; each concurrent call gets its own execution context
        with TRTEngine("model.engine") as eng, ThreadPoolExecutor(4) as pool:
            results = list(pool.map(eng.infer, batches))

    NumPy inputs are staged through pinned host memory and copied to the device; torch CUDA tensors are used
    in place (their ``data_ptr``) and the outputs are returned as torch CUDA tensors, without copies.

    Profiles: ``dfq-deploy build --batch 1,8,32`` makes one optimisation profile per batch size (``min = opt =
    max``) and a ``1..32`` range last. Each call runs on the profile whose opt batch is the call's batch, else on the
    narrowest one containing it (:attr:`profiles`, :meth:`profile_for`); a batch no profile contains is refused in
    one line. Engines built with one profile run every batch on it.

    Threads: :meth:`infer` may be called from any number of threads at once. Each concurrent call borrows an
    execution context (with its own stream and buffers) from a pool (:mod:`dfq_deploy.trt.pool`): a free
    context already on the call's profile, else a new one (up to the number of threads calling at once or of
    profiles, whichever is larger, and ``max_contexts``), else a free one switched to the profile. A context
    holds its own activation memory, so ``max_contexts`` bounds GPU memory on small boards (and when one more
    context does not fit, callers switch or wait). Contexts share profiles (TensorRT >= 10.0);
    ``share_profiles=False`` lets one call at a time use a profile.
    Open and close the engine from one thread; :meth:`close` waits for calls still running, and a closed
    engine refuses further calls until :meth:`open` is called again. The cuda-python backend is needed for
    more than one thread. Each call makes the engine's GPU current in its thread and restores the thread's
    own afterwards.

    CUDA graphs (``cuda_graphs=True``, cuda-python backend, NumPy inputs): when a context sees the same input
    shapes twice in a row it captures the engine into a CUDA graph and replays it while the shapes stay the
    same, which removes the per-kernel launch cost (most visible at batch 1 on Jetson). Outputs equal those of
    ordinary calls. If TensorRT cannot be captured for this engine, the engine says why once and runs without.
    The engine's streams are non-blocking, so other threads may use the default stream during a capture, but
    not device-wide synchronisation (``torch.cuda.synchronize()``, ``cudaDeviceSynchronize``), which CUDA
    forbids while any stream captures.

    The engine is opened on ``with``, by :meth:`open`, or on first use of :meth:`infer` / :attr:`inputs` /
    :attr:`input_shape`; :meth:`close` (or leaving the ``with`` block) frees everything.

    Args:
        path: engine file written by ``dfq-deploy build``.
        backend: ``"cuda-python"`` (default when installed) or ``"pycuda"``.
        keep_timings: append an :class:`InferTiming` per call to :attr:`timing_history`.
        cuda_graphs: replay CUDA graphs for repeated input shapes.
        max_contexts: most execution contexts at once (None: one per concurrent caller).
        check_build: refuse an engine whose build record names another TensorRT version or GPU.
        max_timings: most entries :attr:`timing_history` keeps (the newest; None: all), so a server's history
            stays bounded.
        share_profiles: let concurrent calls run on one profile in several contexts (TensorRT >= 10.0 allows
            it, :mod:`dfq_deploy.trt.pool`); False: one call per profile at a time.

    Raises (when opened):
        DfqError: missing file, no GPU, an engine built by another TensorRT version or for another GPU, or one
            this TensorRT cannot deserialise.
        MissingDependencyError: TensorRT or the CUDA Python bindings are missing.
    """

    def __init__(self, path: str | Path, backend: str | None = None, keep_timings: bool = True,
                 cuda_graphs: bool = False, max_contexts: int | None = None, check_build: bool = True,
                 max_timings: int | None = 100_000, share_profiles: bool = True) -> None:
        self.path = Path(path)
        self.backend_name = backend
        self.keep_timings = keep_timings
        self.cuda_graphs = cuda_graphs
        self.max_contexts = max_contexts
        self.check_build = check_build
        self.share_profiles = share_profiles
        self.timing_history: deque[InferTiming] = deque(maxlen=max_timings)  # append is thread-safe
        self.tensorrt_version: str | None = None
        self._lock = threading.Lock()
        self._tls = threading.local()
        self._inputs: list[TensorInfo] = []
        self._outputs: list[TensorInfo] = []
        self._cuda: CudaPython | PyCuda | None = None
        self._device_index = 0
        self._runtime: Any = None
        self._engine: Any = None
        self._pool: SlotPool | None = None
        self._closed = False

    # lifecycle
    def __enter__(self) -> TRTEngine:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    def open(self) -> None:
        """Check the build record, deserialise the engine and make the first execution context."""
        if self.is_open:
            return
        with self._lock:
            if self.is_open:
                return
            self._open_locked()
            self._closed = False

    def _ensure_open(self) -> None:
        """Open on first use, but not again after :meth:`close` (a straggling call must not reopen it)."""
        if self._closed:
            raise DfqError(f"{self.path} was closed: call open() to use it again")
        self.open()

    def _open_locked(self) -> None:
        if not self.path.is_file():
            raise DfqError(f"engine file not found: {self.path} (build one with dfq-deploy build)")
        trt = require_tensorrt()
        ok, reason = gpu_available()
        if not ok:
            raise DfqError(f"cannot run a TensorRT engine here: no usable NVIDIA GPU ({reason})")
        if self.check_build:
            gpu = gpu_info()
            require_format(str(self.build_info.get("graph_quant", "")), gpu)  # FP8 >= 8.9, NVFP4 >= 10.0
            verdict = check_engine_compat(self.build_info, str(trt.__version__), gpu, str(self.path))
            if not verdict.ok:
                raise DfqError(verdict.error)
            for warning in verdict.warnings:
                logger.warning("%s", warning)
        try:
            self._cuda = cuda_backend(self.backend_name)
            self._device_index = self._cuda.current_device()
            self._runtime = trt.Runtime(trt_logger())  # the one process-wide logger (see trt_logger)
            self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self._engine is None:
                raise DfqError(f"TensorRT {trt.__version__} could not deserialise {self.path}: engines only "
                               "run on the TensorRT version and GPU they were built with; rebuild it with "
                               "dfq-deploy build")
            self.tensorrt_version = str(trt.__version__)
            self._describe(trt)
            cuda, engine = self._cuda, self._engine
            pool = SlotPool(lambda profile: ExecSlot(engine, self._inputs, self._outputs, cuda, str(self.path),
                                                     profile),
                            self.max_contexts, num_profiles=len(self._inputs[0].profiles),
                            share_profiles=self.share_profiles)
            pool.release(pool.acquire(0))  # the first context now, so open() fails early when memory is short
            self._pool = pool
        except BaseException:
            self._close_locked()
            raise
        logger.info("opened %s: inputs %s, outputs %s, profiles %s (%s%s)", self.path,
                    [(t.name, t.shape) for t in self._inputs], [(t.name, t.shape) for t in self._outputs],
                    describe_profiles(profile_table(self._inputs)), self._cuda.name if self._cuda else "?",
                    ", CUDA graphs" if self.cuda_graphs else "")

    def _describe(self, trt: Any) -> None:
        eng = self._engine
        # num_optimization_profiles: "always at least 1"; get_tensor_profile_shape(name, profile_index) -> [min,
        # opt, max] (ICudaEngine, 10.3 and 11.1 bindings and docstrings)
        num_profiles = int(eng.num_optimization_profiles)
        for i in range(eng.num_io_tensors):
            name = eng.get_tensor_name(i)
            is_input = eng.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            trt_dtype = eng.get_tensor_dtype(name)
            try:
                dtype = np.dtype(trt.nptype(trt_dtype))
            except TypeError as exc:
                raise DfqError(f"tensor '{name}' has type {trt_dtype}, which NumPy cannot hold: export the "
                               "model with float32 inputs and outputs") from exc
            shape = tuple(int(d) for d in eng.get_tensor_shape(name))
            profiles = []
            for p in range(num_profiles if is_input else 0):
                lo, opt, hi = eng.get_tensor_profile_shape(name, p)
                profiles.append((tuple(int(d) for d in lo), tuple(int(d) for d in opt), tuple(int(d) for d in hi)))
            info = TensorInfo(name, is_input, dtype, shape, tuple(profiles))
            (self._inputs if is_input else self._outputs).append(info)
        if not self._inputs or not self._outputs:
            raise DfqError(f"{self.path} has no inputs or no outputs")

    def close(self) -> None:
        """Free every context, buffer, event and stream and release the TensorRT objects (safe to call twice)."""
        with self._lock:
            if self._pool is not None:
                self._closed = True
            self._close_locked()

    def _close_locked(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
        self._inputs, self._outputs = [], []
        # TensorRT objects: contexts (in the slots) before engine before runtime
        self._engine = None
        self._runtime = None
        if self._cuda is not None:
            self._cuda.close()
        self._cuda = None

    # properties (opening the engine on first use)
    @property
    def inputs(self) -> list[TensorInfo]:
        self._ensure_open()
        return self._inputs

    @property
    def outputs(self) -> list[TensorInfo]:
        self._ensure_open()
        return self._outputs

    @property
    def input_name(self) -> str:
        return self.inputs[0].name

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Engine shape of the first input, ``-1`` for dynamic dimensions (e.g. ``(-1, 3, 224, 224)``)."""
        return self.inputs[0].shape

    @property
    def input_dtype(self) -> np.dtype:
        return self.inputs[0].dtype

    @property
    def profiles(self) -> list[BatchProfile]:
        """``(min, opt, max)`` batch of the first input per optimisation profile index."""
        return profile_table(self.inputs)

    @property
    def batch_range(self) -> BatchProfile:
        """``(smallest min, opt of the widest profile, largest max)`` batch over all profiles (with one profile: it).

        A batch inside this range may still lack a profile when the engine was built without the range profile:
        :meth:`profile_for` says.
        """
        return batch_envelope(self.profiles)

    def profile_for(self, batch: int) -> int:
        """The profile a call of ``batch`` images runs on (:func:`~dfq_deploy.trt.profiles.choose_profile`).

        Raises:
            DfqError: no profile contains ``batch``.
        """
        return choose_profile(self.profiles, batch)

    @property
    def num_contexts(self) -> int:
        """Execution contexts made so far (the most threads that called at once, capped at ``max_contexts``)."""
        return self._pool.size if self._pool is not None else 0

    @property
    def graph_calls(self) -> int:
        """Calls served by replaying a CUDA graph, over all contexts."""
        return sum(s.graph_calls for s in self._pool.slots) if self._pool is not None else 0

    @property
    def graph_errors(self) -> list[str]:
        """Why CUDA graph capture failed, once per distinct reason (empty when it never failed)."""
        slots = self._pool.slots if self._pool is not None else []
        return list(dict.fromkeys(s.graph_error for s in slots if s.graph_error))

    @property
    def profile_switches(self) -> int:
        """Times a context was switched to another profile (0 while each profile has contexts of its own)."""
        return self._pool.switches if self._pool is not None else 0

    @property
    def build_info(self) -> dict[str, Any]:
        """The ``<engine>.json`` written beside the engine by ``dfq-deploy build`` (empty if absent)."""
        meta = engine_metadata_path(self.path)
        try:
            return dict(json.loads(meta.read_text()))
        except (OSError, ValueError, TypeError):
            return {}

    @property
    def precision(self) -> str | None:
        return self.build_info.get("precision")

    @property
    def device_name(self) -> str | None:
        return self.build_info.get("gpu")

    @property
    def timings(self) -> dict[str, float]:
        """Phases of the calling thread's last :meth:`infer` in ms: ``h2d_ms``, ``compute_ms`` (GPU), ``d2h_ms``.

        Empty before the first call. ``compute_ms`` is measured with CUDA events around the engine;
        the copies are measured separately (0 for torch CUDA tensors, which are not copied).
        """
        t = self.last_timing
        return {} if t is None else {"h2d_ms": t.h2d_ms, "compute_ms": t.compute_ms, "d2h_ms": t.d2h_ms}

    @property
    def last_timing(self) -> InferTiming | None:
        return getattr(self._tls, "last", None)

    def reset_timings(self) -> None:
        self.timing_history.clear()
        self._tls.last = None

    # inference
    def infer(self, inputs: Any) -> Any:
        """Run the engine once; safe to call from several threads at once.

        Args:
            inputs: an array / torch CUDA tensor for a single-input engine, or ``{name: array_or_tensor}``.

        Returns:
            The output (one-output engine) or ``{name: output}``: NumPy arrays for NumPy inputs, torch CUDA
            tensors (on the inputs' device) for torch CUDA inputs.

        Raises:
            DfqError: wrong input names/shapes/types, batch outside the profile, a closed engine.
        """
        self._ensure_open()
        pool, cuda = self._pool, self._cuda
        if pool is None or cuda is None:
            raise DfqError(f"{self.path} was closed: call open() to use it again")
        feed = dict(inputs) if isinstance(inputs, Mapping) else {self.input_name: inputs}
        device_io, profile = check_feed(feed, self._inputs, self._device_index)
        previous = cuda.bind_thread(self._device_index)
        try:
            slot = pool.acquire(profile)
            try:
                if device_io:
                    dtypes = {t.name: torch_dtype(t.dtype) for t in self._outputs}
                    results, timing = slot.run_device(feed, dtypes)
                else:
                    results, timing = slot.run_host(feed, self.cuda_graphs)
            finally:
                pool.release(slot)
        finally:
            if previous != self._device_index:
                cuda.bind_thread(previous)
        self._tls.last = timing
        if self.keep_timings:
            self.timing_history.append(timing)  # list.append is atomic
        return results[self._outputs[0].name] if len(self._outputs) == 1 else results

    def __call__(self, inputs: Any) -> Any:
        return self.infer(inputs)

