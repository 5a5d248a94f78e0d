"""Running exported models: TensorRT engines (:class:`TRTEngine`) and ONNX Runtime (:func:`ort_session`).

:class:`TRTEngine` deserialises an engine, allocates pinned host and device buffers for the largest shape of
its optimisation profile, and runs ``execute_async_v3`` on its own CUDA stream. CUDA memory, streams and
events come from cuda-python (default) or pycuda (where a Jetson image already has it). Every call records
CUDA events around the host-to-device copy, the engine and the device-to-host copy, so benchmarks can
separate GPU compute time from copy time (:attr:`TRTEngine.timings` for the last call,
:attr:`TRTEngine.timing_history` and :func:`summarize_timings` over many).

TensorRT itself is imported through :func:`dfq_deploy.export.tensorrt.require_tensorrt`, only when an engine
is opened; importing this module needs neither TensorRT nor a GPU.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dfq_deploy.errors import DfqError, MissingDependencyError

logger = logging.getLogger(__name__)

BACKENDS = ("cuda-python", "pycuda")


class CudaError(DfqError):
    """A CUDA call failed (out of memory, no device, driver problem)."""


# --- shape checks and timing summaries (plain Python) -----------------------------------------------------
def check_input_shape(
    name: str, shape: Sequence[int], min_shape: Sequence[int], max_shape: Sequence[int]
) -> None:
    """Raise when ``shape`` is outside the engine's optimisation profile ``[min_shape, max_shape]``.

    Raises:
        DfqError: wrong rank, or a dimension outside the profile (the message gives the rebuild flag).
    """
    shape, lo, hi = tuple(int(v) for v in shape), tuple(min_shape), tuple(max_shape)
    if len(shape) != len(lo):
        raise DfqError(f"input '{name}' has shape {list(shape)}, the engine expects rank {len(lo)} "
                       f"({list(lo)} .. {list(hi)})")
    if shape[1:] != lo[1:] and lo[1:] == hi[1:]:
        dims = ", ".join(map(str, lo[1:]))
        raise DfqError(f"input '{name}' has shape {list(shape)}, the engine expects [N, {dims}]: preprocess "
                       "to the model's input size")
    if any(not (a <= s <= b) for s, a, b in zip(shape, lo, hi, strict=True)):
        raise DfqError(f"input '{name}' has batch {shape[0]}, outside the engine's profile {lo[0]}..{hi[0]}: "
                       f"split the batch or rebuild with --batch MIN,OPT,MAX covering {shape[0]}")


@dataclass(frozen=True)
class InferTiming:
    """Times of one :meth:`TRTEngine.infer` call, in milliseconds.

    Attributes:
        batch: batch size of the call.
        h2d_ms: host-to-device copy (CUDA events; 0 for device inputs).
        compute_ms: the engine's GPU time (CUDA events around ``execute_async_v3``).
        d2h_ms: device-to-host copy (CUDA events; 0 for device outputs).
        wall_ms: host wall clock of the whole call, including staging into pinned memory.
    """

    batch: int
    h2d_ms: float
    compute_ms: float
    d2h_ms: float
    wall_ms: float

    @property
    def gpu_ms(self) -> float:
        """Copies plus compute."""
        return self.h2d_ms + self.compute_ms + self.d2h_ms


def summarize_timings(timings: Sequence[InferTiming], skip: int = 0) -> dict[str, Any]:
    """Mean / median / p90 / p99 of each timing field and throughputs over a list of calls.

    Args:
        timings: e.g. :attr:`TRTEngine.timing_history`.
        skip: leading calls to ignore (warm-up).

    Returns:
        ``{"calls", "images", "<field>": {"mean", "median", "p90", "p99"}, "images_per_s_compute",
        "images_per_s_wall"}``.

    Raises:
        DfqError: no calls left after ``skip``.
    """
    rows = list(timings)[skip:]
    if not rows:
        raise DfqError(f"no timed calls to summarise (got {len(timings)}, skipping {skip})")
    out: dict[str, Any] = {"calls": len(rows), "images": int(sum(t.batch for t in rows))}
    for f in ("h2d_ms", "compute_ms", "d2h_ms", "wall_ms", "gpu_ms"):
        v = np.array([getattr(t, f) for t in rows], dtype=np.float64)
        out[f] = {"mean": float(v.mean()), "median": float(np.median(v)), "p90": float(np.percentile(v, 90)),
                  "p99": float(np.percentile(v, 99))}
    compute = sum(t.compute_ms for t in rows)
    wall = sum(t.wall_ms for t in rows)
    out["images_per_s_compute"] = 1000.0 * out["images"] / compute if compute > 0 else float("nan")
    out["images_per_s_wall"] = 1000.0 * out["images"] / wall if wall > 0 else float("nan")
    return out


# --- CUDA backends ----------------------------------------------------------------------------------------
def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def select_backend(preferred: str | None = None) -> str:
    """Name of the CUDA Python backend to use: ``preferred`` if installed, else cuda-python, else pycuda.

    Raises:
        DfqError: unknown backend name.
        MissingDependencyError: the requested backend (or any backend) is not installed.
    """
    have = {"cuda-python": _has_module("cuda.bindings") or _has_module("cuda.cudart"),
            "pycuda": _has_module("pycuda")}
    if preferred is not None:
        if preferred not in BACKENDS:
            raise DfqError(f"CUDA backend {preferred!r}: choose one of {', '.join(BACKENDS)}")
        if not have[preferred]:
            raise MissingDependencyError(f"{preferred} is not installed: pip install {preferred}")
        return preferred
    for name in BACKENDS:
        if have[name]:
            return name
    raise MissingDependencyError("no CUDA Python bindings: pip install cuda-python (or use a pycuda install)")


class _CudaPython:
    """Memory, streams and events through cuda-python's runtime API (uses the primary context)."""

    name = "cuda-python"

    def __init__(self) -> None:
        from dfq_deploy.export.tensorrt import _import_cudart

        rt = _import_cudart()
        if rt is None:
            raise MissingDependencyError("cuda-python is not installed: pip install cuda-python")
        self.rt = rt
        self._hosts: dict[int, int] = {}  # id(array) -> pinned pointer

    def _call(self, result: Any, what: str) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            from dfq_deploy.export.tensorrt import _cuda_error_text

            raise CudaError(f"CUDA {what} failed: {_cuda_error_text(self.rt, err)}")
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else tuple(rest)

    def malloc(self, nbytes: int) -> int:
        return int(self._call(self.rt.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        self._call(self.rt.cudaFree(ptr), "cudaFree")

    def host_empty(self, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = max(int(np.prod(shape)) * dtype.itemsize, 1)
        ptr = int(self._call(self.rt.cudaMallocHost(nbytes), "cudaMallocHost"))
        buf = (ctypes.c_byte * nbytes).from_address(ptr)
        arr = np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)
        self._hosts[id(arr)] = ptr
        return arr

    def host_free(self, arr: np.ndarray) -> None:
        ptr = self._hosts.pop(id(arr), None)
        if ptr is not None:
            self._call(self.rt.cudaFreeHost(ptr), "cudaFreeHost")

    def stream_create(self) -> Any:
        return self._call(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def stream_handle(self, stream: Any) -> int:
        return int(stream)

    def stream_sync(self, stream: Any) -> None:
        self._call(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def stream_destroy(self, stream: Any) -> None:
        self._call(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, stream),
                   "cudaMemcpyAsync H2D")

    def dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, stream),
                   "cudaMemcpyAsync D2H")

    def copy_htod(self, dst: int, src: np.ndarray) -> None:
        src = np.ascontiguousarray(src)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self.rt.cudaMemcpy(dst, src.ctypes.data, src.nbytes, kind), "cudaMemcpy H2D")

    def event_create(self) -> Any:
        return self._call(self.rt.cudaEventCreate(), "cudaEventCreate")

    def event_record(self, event: Any, stream: Any) -> None:
        self._call(self.rt.cudaEventRecord(event, stream), "cudaEventRecord")

    def event_sync(self, event: Any) -> None:
        self._call(self.rt.cudaEventSynchronize(event), "cudaEventSynchronize")

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return float(self._call(self.rt.cudaEventElapsedTime(start, end), "cudaEventElapsedTime"))

    def event_destroy(self, event: Any) -> None:
        self._call(self.rt.cudaEventDestroy(event), "cudaEventDestroy")

    def close(self) -> None:
        pass


class _PyCuda:
    """The same operations through pycuda, on device 0's primary context (pushed while open)."""

    name = "pycuda"

    def __init__(self) -> None:
        try:
            import pycuda.driver as drv
        except ImportError as exc:
            raise MissingDependencyError("pycuda is not installed: pip install pycuda") from exc
        self.drv = drv
        try:
            drv.init()
            self.ctx = drv.Device(0).retain_primary_context()
        except Exception as exc:
            raise CudaError(f"pycuda could not initialise CUDA: {exc}") from exc
        self.ctx.push()
        self._allocs: dict[int, Any] = {}

    def malloc(self, nbytes: int) -> int:
        alloc = self.drv.mem_alloc(max(int(nbytes), 1))
        self._allocs[int(alloc)] = alloc
        return int(alloc)

    def free(self, ptr: int) -> None:
        alloc = self._allocs.pop(int(ptr), None)
        if alloc is not None:
            alloc.free()

    def host_empty(self, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
        return self.drv.pagelocked_empty(tuple(shape), np.dtype(dtype))

    def host_free(self, arr: np.ndarray) -> None:
        base = getattr(arr, "base", None)
        if base is not None and hasattr(base, "free"):
            base.free()

    def stream_create(self) -> Any:
        return self.drv.Stream()

    def stream_handle(self, stream: Any) -> int:
        return int(stream.handle)

    def stream_sync(self, stream: Any) -> None:
        stream.synchronize()

    def stream_destroy(self, stream: Any) -> None:
        del stream

    def htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        self.drv.memcpy_htod_async(dst, src, stream)

    def dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        self.drv.memcpy_dtoh_async(dst, src, stream)

    def copy_htod(self, dst: int, src: np.ndarray) -> None:
        self.drv.memcpy_htod(dst, np.ascontiguousarray(src))

    def event_create(self) -> Any:
        return self.drv.Event()

    def event_record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def event_sync(self, event: Any) -> None:
        event.synchronize()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return float(end.time_since(start))

    def event_destroy(self, event: Any) -> None:
        del event

    def close(self) -> None:
        try:
            self.drv.Context.pop()
        except Exception:
            logger.debug("pycuda: no context to pop")


def cuda_backend(preferred: str | None = None) -> _CudaPython | _PyCuda:
    """An initialised CUDA backend (see :func:`select_backend`)."""
    return _PyCuda() if select_backend(preferred) == "pycuda" else _CudaPython()


# --- TensorRT engine --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    """One engine I/O tensor.

    Attributes:
        name: tensor name.
        is_input: input (True) or output.
        dtype: NumPy dtype.
        shape: engine shape (``-1`` for dynamic dimensions).
        profile: ``(min, opt, max)`` shapes for inputs, None for outputs.
    """

    name: str
    is_input: bool
    dtype: np.dtype
    shape: tuple[int, ...]
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None


def _is_torch_cuda(x: Any) -> bool:
    mod = type(x).__module__
    return mod.startswith("torch") and hasattr(x, "data_ptr") and getattr(x, "is_cuda", False)


class TRTEngine:
    """A deserialised TensorRT engine with its buffers; use it as a context manager.

    Example::

        with TRTEngine("model.engine") as eng:
            logits = eng.infer(images)            # numpy [N, C, H, W] float32 -> numpy logits
            eng.timings                           # last call: {"h2d_ms", "compute_ms", "d2h_ms"}
            print(summarize_timings(eng.timing_history, skip=1))

    NumPy inputs are staged through pinned host memory and copied to the device; torch CUDA tensors are
    used in place (their ``data_ptr``) and the outputs are returned as torch CUDA tensors, without copies.
    The batch may vary within the engine's optimisation profile.

    The engine is opened on ``with``, by :meth:`open`, or on first use of :meth:`infer` / :attr:`inputs` /
    :attr:`input_shape`; :meth:`close` (or leaving the ``with`` block) frees everything.

    Args:
        path: engine file written by ``dfq-deploy build``.
        backend: ``"cuda-python"`` (default when installed) or ``"pycuda"``.
        keep_timings: append an :class:`InferTiming` per call to :attr:`timing_history`.

    Raises (when opened):
        DfqError: missing file, no GPU, or an engine this TensorRT cannot deserialise.
        MissingDependencyError: TensorRT or the CUDA Python bindings are missing.
    """

    def __init__(self, path: str | Path, backend: str | None = None, keep_timings: bool = True) -> None:
        self.path = Path(path)
        self.backend_name = backend
        self.keep_timings = keep_timings
        self.timing_history: list[InferTiming] = []
        self._last: InferTiming | None = None
        self._inputs: list[TensorInfo] = []
        self._outputs: list[TensorInfo] = []
        self.tensorrt_version: str | None = None
        self._cuda: _CudaPython | _PyCuda | None = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._events: list[Any] = []
        self._device: dict[str, int] = {}
        self._host: dict[str, np.ndarray] = {}
        self._trt_logger: Any = None

    # lifecycle
    def __enter__(self) -> TRTEngine:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return self._context is not None

    def open(self) -> None:
        """Deserialise the engine and allocate buffers, stream and events."""
        if self.is_open:
            return
        if not self.path.is_file():
            raise DfqError(f"engine file not found: {self.path} (build one with dfq-deploy build)")
        from dfq_deploy.export.tensorrt import _make_trt_logger, gpu_available, require_tensorrt

        trt = require_tensorrt()
        ok, reason = gpu_available()
        if not ok:
            raise DfqError(f"cannot run a TensorRT engine here: no usable NVIDIA GPU ({reason})")
        try:
            self._cuda = cuda_backend(self.backend_name)
            self._trt_logger = _make_trt_logger(trt, logger)
            self._runtime = trt.Runtime(self._trt_logger)
            self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self._engine is None:
                raise DfqError(f"TensorRT {trt.__version__} could not deserialise {self.path}: engines only "
                               "run on the TensorRT version and GPU they were built with; rebuild it with "
                               "dfq-deploy build")
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise CudaError(f"could not create an execution context for {self.path} (out of GPU memory?)")
            self.tensorrt_version = str(trt.__version__)
            self._describe(trt)
            self._allocate()
        except BaseException:
            self.close()
            raise
        logger.info("opened %s: inputs %s, outputs %s (%s)", self.path,
                    [(t.name, t.shape) for t in self._inputs], [(t.name, t.shape) for t in self._outputs],
                    self._cuda.name if self._cuda else "?")

    def _describe(self, trt: Any) -> None:
        eng = self._engine
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
            profile = None
            if is_input:
                lo, opt, hi = eng.get_tensor_profile_shape(name, 0)
                profile = (tuple(int(d) for d in lo), tuple(int(d) for d in opt), tuple(int(d) for d in hi))
            info = TensorInfo(name, is_input, dtype, shape, profile)
            (self._inputs if is_input else self._outputs).append(info)
        if not self._inputs or not self._outputs:
            raise DfqError(f"{self.path} has no inputs or no outputs")

    def _allocate(self) -> None:
        cuda, ctx = self._cuda, self._context
        assert cuda is not None
        for t in self._inputs:
            assert t.profile is not None
            if not ctx.set_input_shape(t.name, t.profile[2]):
                raise DfqError(f"TensorRT rejected the profile's max shape {t.profile[2]} for '{t.name}'")
        for t in self._inputs + self._outputs:
            max_shape = t.profile[2] if t.is_input and t.profile else ctx.get_tensor_shape(t.name)
            shape = tuple(int(d) for d in max_shape)
            if any(d < 0 for d in shape):
                raise DfqError(f"output '{t.name}' has a data-dependent shape {shape}: not supported")
            self._device[t.name] = cuda.malloc(int(np.prod(shape)) * t.dtype.itemsize)
            self._host[t.name] = cuda.host_empty(shape, t.dtype)
        self._stream = cuda.stream_create()
        self._events = [cuda.event_create() for _ in range(4)]

    def close(self) -> None:
        """Free buffers, events and stream and release the TensorRT objects (safe to call twice)."""
        cuda = self._cuda
        if cuda is not None:
            if self._stream is not None:
                try:
                    cuda.stream_sync(self._stream)
                except DfqError as exc:
                    logger.warning("while closing %s: %s", self.path, exc)
            for ptr in self._device.values():
                cuda.free(ptr)
            for arr in self._host.values():
                cuda.host_free(arr)
            for ev in self._events:
                cuda.event_destroy(ev)
            if self._stream is not None:
                cuda.stream_destroy(self._stream)
        self._device, self._host, self._events, self._stream = {}, {}, [], None
        self._inputs, self._outputs = [], []
        # TensorRT objects: context before engine before runtime
        self._context = None
        self._engine = None
        self._runtime = None
        if cuda is not None:
            cuda.close()
        self._cuda = None

    # properties (opening the engine on first use)
    @property
    def inputs(self) -> list[TensorInfo]:
        self.open()
        return self._inputs

    @property
    def outputs(self) -> list[TensorInfo]:
        self.open()
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
    def batch_range(self) -> tuple[int, int, int]:
        """``(min, opt, max)`` batch of the first input's profile."""
        prof = self.inputs[0].profile
        assert prof is not None
        return prof[0][0], prof[1][0], prof[2][0]

    @property
    def build_info(self) -> dict[str, Any]:
        """The ``<engine>.json`` written beside the engine by ``dfq-deploy build`` (empty if absent)."""
        from dfq_deploy.export.tensorrt import engine_metadata_path

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
        """Phases of the last :meth:`infer` call in ms: ``h2d_ms``, ``compute_ms`` (GPU), ``d2h_ms``.

        Empty before the first call. ``compute_ms`` is measured with CUDA events around ``execute_async_v3``;
        the copies are measured separately (0 for torch CUDA tensors, which are not copied).
        """
        t = self._last
        return {} if t is None else {"h2d_ms": t.h2d_ms, "compute_ms": t.compute_ms, "d2h_ms": t.d2h_ms}

    @property
    def last_timing(self) -> InferTiming | None:
        return self._last

    def reset_timings(self) -> None:
        self.timing_history.clear()
        self._last = None

    # inference
    def infer(self, inputs: Any) -> Any:
        """Run the engine once.

        Args:
            inputs: an array / torch CUDA tensor for a single-input engine, or ``{name: array_or_tensor}``.

        Returns:
            The output (one-output engine) or ``{name: output}``: NumPy arrays for NumPy inputs, torch CUDA
            tensors (on the inputs' device) for torch CUDA inputs.

        Raises:
            DfqError: engine not open, wrong input names/shapes/types, batch outside the profile.
        """
        self.open()
        cuda, ctx = self._cuda, self._context
        assert cuda is not None
        t0 = time.perf_counter()
        feed = inputs if isinstance(inputs, Mapping) else {self.input_name: inputs}
        expected = {t.name for t in self.inputs}
        if set(feed) != expected:
            raise DfqError(f"engine inputs are {sorted(expected)}, got {sorted(feed)}")
        on_device = [_is_torch_cuda(v) for v in feed.values()]
        if any(on_device) and not all(on_device):
            raise DfqError("mix of torch CUDA tensors and host arrays: pass all inputs on the same side")
        device_io = all(on_device)
        torch_outs: dict[str, Any] = {}
        staged: dict[str, np.ndarray] = {}
        device_ref = None
        keep_alive: list[Any] = []  # contiguous copies of device inputs must outlive the execution
        for t in self.inputs:
            x = feed[t.name]
            assert t.profile is not None
            check_input_shape(t.name, tuple(x.shape), t.profile[0], t.profile[2])
            if device_io:
                x = self._torch_input(t, x)
                device_ref = x
                keep_alive.append(x)
                ctx.set_tensor_address(t.name, int(x.data_ptr()))
            else:
                arr = np.asarray(x)
                if arr.dtype != t.dtype:
                    raise DfqError(f"input '{t.name}' is {arr.dtype}, the engine expects {t.dtype}")
                host = self._host[t.name].reshape(-1)[: arr.size].reshape(arr.shape)
                np.copyto(host, arr)
                staged[t.name] = host
                ctx.set_tensor_address(t.name, self._device[t.name])
            if not ctx.set_input_shape(t.name, tuple(int(d) for d in x.shape)):
                raise DfqError(f"TensorRT rejected input shape {list(x.shape)} for '{t.name}'")
        out_shapes = {t.name: tuple(int(d) for d in ctx.get_tensor_shape(t.name)) for t in self.outputs}
        for t in self.outputs:
            if device_io:
                import torch

                out = torch.empty(out_shapes[t.name], dtype=_torch_dtype(t.dtype), device=device_ref.device)
                torch_outs[t.name] = out
                ctx.set_tensor_address(t.name, int(out.data_ptr()))
            else:
                ctx.set_tensor_address(t.name, self._device[t.name])

        ev = self._events
        stream = self._stream
        if device_io:
            import torch

            torch.cuda.current_stream(device_ref.device).synchronize()  # inputs are ready before we read them
        cuda.event_record(ev[0], stream)
        for name, host in staged.items():
            cuda.htod_async(self._device[name], host, stream)
        cuda.event_record(ev[1], stream)
        if not ctx.execute_async_v3(cuda.stream_handle(stream)):
            raise DfqError(f"TensorRT execution failed for {self.path} (see the TensorRT errors above)")
        cuda.event_record(ev[2], stream)
        results: dict[str, Any] = {}
        for t in self.outputs:
            if device_io:
                results[t.name] = torch_outs[t.name]
            else:
                shape = out_shapes[t.name]
                host = self._host[t.name].reshape(-1)[: int(np.prod(shape))].reshape(shape)
                cuda.dtoh_async(host, self._device[t.name], stream)
                results[t.name] = host
        cuda.event_record(ev[3], stream)
        cuda.event_sync(ev[3])
        keep_alive.clear()
        if not device_io:
            results = {k: v.copy() for k, v in results.items()}  # the pinned buffers are reused next call
        batch = int(next(iter(feed.values())).shape[0])
        self._last = InferTiming(batch, cuda.elapsed_ms(ev[0], ev[1]), cuda.elapsed_ms(ev[1], ev[2]),
                                 cuda.elapsed_ms(ev[2], ev[3]), 1000 * (time.perf_counter() - t0))
        if self.keep_timings:
            self.timing_history.append(self._last)
        return results[self.outputs[0].name] if len(self.outputs) == 1 else results

    def _torch_input(self, t: TensorInfo, x: Any) -> Any:
        want = _torch_dtype(t.dtype)
        if x.dtype != want:
            raise DfqError(f"input '{t.name}' is {x.dtype}, the engine expects {want}")
        if not x.is_contiguous():
            logger.debug("input '%s' is not contiguous: copying", t.name)
            x = x.contiguous()
        return x

    def __call__(self, inputs: Any) -> Any:
        return self.infer(inputs)


def _torch_dtype(dtype: np.dtype) -> Any:
    import torch

    table = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
             np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64, np.dtype(np.int8): torch.int8,
             np.dtype(np.uint8): torch.uint8, np.dtype(np.bool_): torch.bool}
    try:
        return table[np.dtype(dtype)]
    except KeyError as exc:
        raise DfqError(f"no torch dtype for {dtype}") from exc


# --- ONNX Runtime -----------------------------------------------------------------------------------------
def ort_session(path: str | Path | Any, threads: int | None = None, optimize: bool = True, gpu: bool = False,
                config: dict[str, str] | None = None):
    """An ONNX Runtime ``InferenceSession``.

    Args:
        path: ONNX file (or an ``onnx.ModelProto``).
        threads: intra-op threads (None: ONNX Runtime's default).
        optimize: all graph optimizations (what a user deploys) or none (the reference for parity checks:
            ORT's fused integer kernels round differently).
        gpu: also request the TensorRT and CUDA execution providers, in that order, where this ONNX Runtime
            build has them (a warning names the ones it lacks); CPU is always the last provider.
        config: extra session config entries (e.g. ``session.qdq_matmulnbits_accuracy_level``).

    Raises:
        DfqError: the file is missing or ONNX Runtime cannot load it.
    """
    import onnxruntime as ort

    if hasattr(path, "SerializeToString"):
        src: Any = path.SerializeToString()
        label = "<in-memory model>"
    else:
        p = Path(path)
        if not p.is_file():
            raise DfqError(f"ONNX file not found: {p}")
        src, label = str(p), str(p)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads:
        if threads < 1:
            raise DfqError(f"threads {threads} must be >= 1")
        so.intra_op_num_threads = int(threads)
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    providers = ["CPUExecutionProvider"]
    if gpu:
        available = set(ort.get_available_providers())
        wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
        missing = [p for p in wanted if p not in available]
        if missing:
            logger.warning("ONNX Runtime %s lacks %s: using %s", ort.__version__, missing,
                           [p for p in wanted if p in available] + providers)
        providers = [p for p in wanted if p in available] + providers
    try:
        return ort.InferenceSession(src, so, providers=providers)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DfqError(f"ONNX Runtime cannot load {label}: {first}") from exc


__all__ = ["BACKENDS", "CudaError", "InferTiming", "TRTEngine", "TensorInfo", "check_input_shape",
           "cuda_backend", "ort_session", "select_backend", "summarize_timings"]
