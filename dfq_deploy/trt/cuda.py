"""CUDA memory, streams and events for TensorRT, through cuda-python (default) or pycuda.

Both backends expose the same small set of operations (:class:`CudaPython`, :class:`PyCuda`); the engine
runner and the INT8 calibrator use whichever :func:`cuda_backend` returns. Only cuda-python serves an engine
from several threads (the runtime API binds a device per thread) and captures CUDA graphs; pycuda refuses both
with a line that says to install cuda-python.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dfq_deploy.errors import DfqError, MissingDependencyError

logger = logging.getLogger(__name__)

BACKENDS = ("cuda-python", "pycuda")


class CudaError(DfqError):
    """A CUDA call failed (out of memory, no device, driver problem)."""



def import_cudart() -> Any | None:
    """cuda-python's runtime module (new ``cuda.bindings`` layout first, then the old ``cuda.cudart``)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            return None
    return cudart


def cuda_error_text(cudart: Any, err: Any) -> str:
    """``"cudaErrorX (description)"`` for a cuda-python error code."""
    name, desc = getattr(err, "name", str(err)), ""
    try:
        res = cudart.cudaGetErrorString(err)
        desc = res[1] if isinstance(res, tuple) else res
        desc = desc.decode() if isinstance(desc, bytes) else str(desc)
    except Exception:
        pass
    return f"{name} ({desc})" if desc else name


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


class CudaPython:
    """Memory, streams and events through cuda-python's runtime API (uses the primary context)."""

    name = "cuda-python"

    def __init__(self) -> None:
        rt = import_cudart()
        if rt is None:
            raise MissingDependencyError("cuda-python is not installed: pip install cuda-python")
        self.rt = rt
        self._hosts: dict[int, int] = {}  # id(array) -> pinned pointer

    def _call(self, result: Any, what: str) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise CudaError(f"CUDA {what} failed: {cuda_error_text(self.rt, err)}")
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
        # Non-blocking: while one thread captures a CUDA graph on a blocking stream, any use of the legacy
        # default stream (torch's default, cudaMemcpy) in any thread is invalid (CUDA Programming Guide,
        # "Prohibited and Unhandled Operations"); a non-blocking stream keeps other threads' work legal.
        return self._call(self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking),
                          "cudaStreamCreateWithFlags")

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

    # devices: the runtime API keeps a current device per host thread (device 0 in a new thread)
    def current_device(self) -> int:
        return int(self._call(self.rt.cudaGetDevice(), "cudaGetDevice"))

    def bind_thread(self, device: int) -> int:
        """Make ``device`` current in the calling thread (threads start on device 0); returns the previous one."""
        previous = self.current_device()
        if previous != int(device):
            self._call(self.rt.cudaSetDevice(int(device)), "cudaSetDevice")
        return previous

    # CUDA graphs (stream capture)
    supports_graphs = True

    def graph_capture(self, stream: Any, work: Callable[[], bool]) -> tuple[Any | None, str]:
        """Capture what ``work()`` enqueues on ``stream`` into an instantiated CUDA graph.

        Capture is thread-local (``cudaStreamCaptureModeThreadLocal``), so other threads may keep launching
        work meanwhile. The capture is always ended, also when ``work`` fails or raises, so the stream is
        usable afterwards.

        Returns:
            ``(graph_exec, "")``, or ``(None, reason)`` when ``work`` returned False or CUDA refused the capture.
        """
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._call(self.rt.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")
        ok, graph, reason = False, None, ""
        try:
            ok = bool(work())
        finally:
            err, graph = self.rt.cudaStreamEndCapture(stream)
            if int(err) != 0:
                reason = f"cudaStreamEndCapture: {cuda_error_text(self.rt, err)}"
            if not ok or reason:
                self._forget(graph)  # also when work() raised
        if reason or not ok:
            return None, reason or "the work refused to run under stream capture"
        err, graph_exec = self.rt.cudaGraphInstantiateWithFlags(graph, 0)
        self.rt.cudaGraphDestroy(graph)  # the instantiated graph does not need its template
        if int(err) != 0:
            self.rt.cudaGetLastError()
            return None, f"cudaGraphInstantiate: {cuda_error_text(self.rt, err)}"
        return graph_exec, ""

    def _forget(self, graph: Any) -> None:
        """Destroy a failed capture's graph and clear CUDA's last error, as trtexec does after a failed capture."""
        if graph is not None:
            try:
                self.rt.cudaGraphDestroy(graph)
            except Exception:  # noqa: BLE001 - cleaning up after a failure already being reported
                logger.debug("could not destroy a failed capture's graph")
        self.rt.cudaGetLastError()

    def graph_launch(self, graph_exec: Any, stream: Any) -> None:
        self._call(self.rt.cudaGraphLaunch(graph_exec, stream), "cudaGraphLaunch")

    def graph_destroy(self, graph_exec: Any) -> None:
        self._call(self.rt.cudaGraphExecDestroy(graph_exec), "cudaGraphExecDestroy")

    def close(self) -> None:
        pass


class PyCuda:
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
        self._owner = threading.get_ident()
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

    # devices: pycuda's context was pushed on the opening thread only
    def current_device(self) -> int:
        return 0

    def bind_thread(self, device: int) -> int:
        """Refuse other threads: the pycuda context is current on the thread that opened the engine only."""
        if threading.get_ident() != self._owner:
            raise DfqError("the pycuda backend runs an engine from the thread that opened it only: install "
                           "cuda-python (pip install cuda-python) to share one engine across threads")
        return 0

    supports_graphs = False

    def graph_capture(self, stream: Any, work: Callable[[], bool]) -> tuple[Any | None, str]:
        return None, "CUDA graphs need the cuda-python backend (pip install cuda-python)"

    def graph_launch(self, graph_exec: Any, stream: Any) -> None:
        raise DfqError("CUDA graphs need the cuda-python backend")

    def graph_destroy(self, graph_exec: Any) -> None:
        pass

    def close(self) -> None:
        try:
            self.drv.Context.pop()
        except Exception:
            logger.debug("pycuda: no context to pop")


def cuda_backend(preferred: str | None = None) -> CudaPython | PyCuda:
    """An initialised CUDA backend (see :func:`select_backend`)."""
    return PyCuda() if select_backend(preferred) == "pycuda" else CudaPython()
