"""Running a TensorRT engine from an app: :class:`TRTEngine`.

:class:`TRTEngine` deserialises an engine, allocates pinned host and device buffers for the largest shape of
its optimisation profile, and runs ``execute_async_v3`` on its own CUDA stream. CUDA memory, streams and
events come from :mod:`dfq_deploy.trt.cuda`. Every call records CUDA events around the host-to-device copy,
the engine and the device-to-host copy, so benchmarks can separate GPU compute time from copy time
(:attr:`TRTEngine.timings` for the last call, :attr:`TRTEngine.timing_history` and
:func:`~dfq_deploy.trt.timing.summarize_timings` over many).

TensorRT is imported only when an engine is opened; importing this module needs neither TensorRT nor a GPU.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dfq_deploy.errors import DfqError
from dfq_deploy.trt.cuda import CudaError, CudaPython, PyCuda, cuda_backend
from dfq_deploy.trt.env import gpu_available, require_tensorrt, trt_logger
from dfq_deploy.trt.plan import engine_metadata_path
from dfq_deploy.trt.timing import InferTiming, check_input_shape

logger = logging.getLogger(__name__)


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
        self._cuda: CudaPython | PyCuda | None = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._events: list[Any] = []
        self._device: dict[str, int] = {}
        self._host: dict[str, np.ndarray] = {}

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
        trt = require_tensorrt()
        ok, reason = gpu_available()
        if not ok:
            raise DfqError(f"cannot run a TensorRT engine here: no usable NVIDIA GPU ({reason})")
        try:
            self._cuda = cuda_backend(self.backend_name)
            self._runtime = trt.Runtime(trt_logger())  # the one process-wide logger (see trt_logger)
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

