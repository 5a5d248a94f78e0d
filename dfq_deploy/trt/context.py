"""One execution context of an engine with everything a call needs: :class:`ExecSlot`.

TensorRT's rule for threads: "The TensorRT runtime can be used by multiple threads simultaneously, so long as
each object uses a different execution context" (Developer Guide, "Thread Safety"), and each context should
have a CUDA stream of its own. Every context of an engine starts on optimization profile 0
(``createExecutionContext``, NvInferRuntime.h); whether contexts may share a profile (yes since TensorRT 10.0)
is set out in :mod:`dfq_deploy.trt.pool`.

A slot is the unit of one call: an ``IExecutionContext`` on one optimisation profile, its (non-blocking) stream,
its timing events, its pinned host and device buffers for the largest shape of any profile, and at most one CUDA
graph. It starts on the profile it was made for and switches with :meth:`ExecSlot.use_profile`:
``set_optimization_profile_async(profile_index, stream_handle)`` (``IExecutionContext``, TensorRT 10.3 and 11.1
Python bindings; it raises RuntimeError when the index is out of range) "must be called before calling
setInputShape()", may enqueue copies on the stream it is given ("the application's responsibility to guarantee
that synchronization between the profile sync stream and the enqueue stream occurs": the slot passes its own
stream, so the copies run before its next enqueue), and triggers "layer resource updates on the next call of
executeV2()/enqueueV3()". So after a switch the slot sets shapes and addresses again, drops its CUDA graph, and
runs the next call plainly (the updates happen there, never inside a capture).
:class:`~dfq_deploy.trt.engine.TRTEngine` keeps a :class:`~dfq_deploy.trt.pool.SlotPool`, which lends one slot
to each call, on the call's profile, so concurrent callers never share one.

CUDA graphs (TensorRT 11.0 "Optimizing TensorRT Performance", CUDA Graphs;
https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/performance/optimization.html): ``execute_async_v3`` may
be captured on a non-default stream once the input shapes are set and one ordinary call has run with them (it
flushes TensorRT's deferred, shape-dependent updates). A graph fixes the shapes and every tensor address, so a
slot captures a graph only for its own staging buffers (NumPy inputs, not torch tensors, whose addresses change
each call), only when the same shapes come twice in a row, and drops it when the shapes change. Only the engine
is in the graph; the copies stay ordinary async copies, timed by the same events as without a graph. When
capture fails (an engine with data-dependent shapes, loops, or a plugin that synchronises), the slot says why
once and runs without graphs from then on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dfq_deploy.errors import DfqError
from dfq_deploy.trt.cuda import CudaError, CudaPython, PyCuda
from dfq_deploy.trt.timing import InferTiming

logger = logging.getLogger(__name__)

Shapes = tuple[tuple[int, ...], ...]
ProfileShapes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class TensorInfo:
    """One engine I/O tensor.

    Attributes:
        name: tensor name.
        is_input: input (True) or output.
        dtype: NumPy dtype.
        shape: engine shape (``-1`` for dynamic dimensions).
        profiles: ``(min, opt, max)`` shapes per optimisation profile index for inputs, empty for outputs.
    """

    name: str
    is_input: bool
    dtype: np.dtype
    shape: tuple[int, ...]
    profiles: tuple[ProfileShapes, ...] = ()

    @property
    def profile(self) -> ProfileShapes | None:
        """Over all profiles: ``(smallest min, opt of the widest profile, largest max)``; None for outputs.

        With one profile this is that profile; its max is what the slot's buffers hold.
        """
        if not self.profiles:
            return None
        lo = tuple(min(p[0][d] for p in self.profiles) for d in range(len(self.profiles[0][0])))
        hi = tuple(max(p[2][d] for p in self.profiles) for d in range(len(self.profiles[0][2])))
        widest = max(self.profiles, key=lambda p: int(np.prod(p[2])) - int(np.prod(p[0])))
        return lo, widest[1], hi


class ExecSlot:
    """An execution context with its stream, events, staging buffers and CUDA graph.

    Not thread-safe by itself: one caller at a time (the engine's pool guarantees it).

    Args:
        engine: the deserialised ``ICudaEngine``.
        inputs: the engine's inputs.
        outputs: the engine's outputs.
        cuda: the CUDA backend.
        label: how to name the engine in messages.
        profile: the optimisation profile to start on.
    """

    def __init__(self, engine: Any, inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo],
                 cuda: CudaPython | PyCuda, label: str, profile: int = 0) -> None:
        self.inputs, self.outputs, self.cuda, self.label = list(inputs), list(outputs), cuda, label
        self.profile = 0  # "The newly created execution context will be assigned optimization profile 0"
        self._capacity: dict[str, int] = {}
        self._device: dict[str, int] = {}
        self._host: dict[str, np.ndarray] = {}
        self._events: list[Any] = []
        self._stream: Any = None
        self._graph: Any = None
        self._graph_shapes: Shapes | None = None
        self._state: Shapes | None = None  # input shapes of the last ordinary call or capture on this context
        self.graph_calls = 0
        self.graph_error: str | None = None
        self.context = engine.create_execution_context()
        if self.context is None:
            raise CudaError(f"could not create an execution context for {label} (out of GPU memory?)")
        try:
            self._stream = cuda.stream_create()
            self._events = [cuda.event_create() for _ in range(4)]
            self._allocate()
            self.use_profile(profile)
        except BaseException:
            self.close()
            raise

    def _allocate(self) -> None:
        """Buffers for the largest shapes of any profile: outputs measured on the profile with the largest inputs."""
        cuda, ctx = self.cuda, self.context
        largest = max(range(len(self.inputs[0].profiles)),
                      key=lambda i: sum(int(np.prod(t.profiles[i][2])) for t in self.inputs))
        self.use_profile(largest)
        for t in self.inputs:
            if not ctx.set_input_shape(t.name, t.profiles[largest][2]):
                raise DfqError(f"TensorRT rejected profile {largest}'s max shape {t.profiles[largest][2]} for "
                               f"'{t.name}'")
        for t in self.inputs + self.outputs:
            max_shape = t.profile[2] if t.is_input and t.profile else ctx.get_tensor_shape(t.name)
            shape = tuple(int(d) for d in max_shape)
            if any(d < 0 for d in shape):
                raise DfqError(f"output '{t.name}' has a data-dependent shape {shape}: not supported")
            self._capacity[t.name] = int(np.prod(shape))
            self._device[t.name] = cuda.malloc(int(np.prod(shape)) * t.dtype.itemsize)
            self._host[t.name] = cuda.host_empty(shape, t.dtype)

    def use_profile(self, index: int) -> None:
        """Run the next calls on optimisation profile ``index`` (nothing to do when the slot is on it already).

        Raises:
            DfqError: TensorRT refused the switch (the slot stays on its profile).
        """
        if index == self.profile:
            return
        try:  # the binding raises RuntimeError ("Error in set optimization profile async.") where C++ says false
            ok = self.context.set_optimization_profile_async(int(index), self.cuda.stream_handle(self._stream))
        except RuntimeError as exc:
            ok, why = False, str(exc)
        else:
            why = "it returned False"
        if not ok:
            raise DfqError(f"TensorRT could not switch {self.label} to optimisation profile {index} ({why})")
        self.profile = int(index)
        self._drop_graph()  # captured under the other profile
        self._state = None  # shapes and addresses are set again before the next call, which runs plainly

    def close(self) -> None:
        """Free the graph, buffers, events and stream, and release the context (safe to call twice).

        Each release is attempted even when an earlier one fails (after a device fault every call may fail):
        failures are logged, never raised, so the other slots and the engine are released too.
        """
        cuda = self.cuda

        def attempt(what: str, fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - cleanup goes on
                logger.warning("while closing %s (%s): %s", self.label, what, exc)

        if self._stream is not None:
            attempt("stream sync", cuda.stream_sync, self._stream)
        attempt("CUDA graph", self._drop_graph)
        for ptr in self._device.values():
            attempt("device buffer", cuda.free, ptr)
        for arr in self._host.values():
            attempt("pinned buffer", cuda.host_free, arr)
        for ev in self._events:
            attempt("event", cuda.event_destroy, ev)
        if self._stream is not None:
            attempt("stream", cuda.stream_destroy, self._stream)
        self._device, self._host, self._events, self._stream = {}, {}, [], None
        self.context = None

    def _drop_graph(self) -> None:
        if self._graph is not None:
            try:
                self.cuda.graph_destroy(self._graph)
            except DfqError as exc:
                logger.warning("while freeing the CUDA graph of %s: %s", self.label, exc)
        self._graph, self._graph_shapes = None, None

    # --- one call ---------------------------------------------------------------------------------------
    def _set_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, shape):
                raise DfqError(f"TensorRT rejected input shape {list(shape)} for '{name}'")

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.cuda.stream_handle(self._stream)):
            raise DfqError(f"TensorRT execution failed for {self.label} (see the TensorRT errors above)")

    def _engine_step(self, key: Shapes, use_graph: bool) -> None:
        """Enqueue the engine for input shapes ``key``: replay the graph, capture one, or run it plainly."""
        if self._graph is not None and self._graph_shapes == key and self._state == key:
            self.cuda.graph_launch(self._graph, self._stream)
            self.graph_calls += 1
            return
        if self._graph is not None:  # the shapes changed: the graph no longer fits
            self._drop_graph()
        if use_graph and self.graph_error is None and self._state == key:
            # the previous call ran these shapes plainly, so TensorRT's deferred updates are flushed
            graph, reason = self.cuda.graph_capture(self._stream, lambda: bool(
                self.context.execute_async_v3(self.cuda.stream_handle(self._stream))))
            if graph is not None:
                self._graph, self._graph_shapes = graph, key
                self.cuda.graph_launch(graph, self._stream)
                self.graph_calls += 1
                return
            self.graph_error = reason
            logger.warning("%s: CUDA graph capture failed (%s); running without CUDA graphs", self.label, reason)
        self._execute()
        self._state = key

    def run_host(self, feed: Mapping[str, np.ndarray], use_graph: bool) -> tuple[dict[str, np.ndarray],
                                                                               InferTiming]:
        """Run NumPy inputs (checked by the caller) through pinned staging buffers; return copies of the outputs."""
        t0 = time.perf_counter()
        cuda, ctx, ev, stream = self.cuda, self.context, self._events, self._stream
        shapes = {t.name: tuple(int(d) for d in feed[t.name].shape) for t in self.inputs}
        key: Shapes = tuple(shapes[t.name] for t in self.inputs)
        staged = {}
        for t in self.inputs:
            arr = feed[t.name]
            host = self._host[t.name].reshape(-1)[: arr.size].reshape(arr.shape)
            np.copyto(host, arr)
            staged[t.name] = host
        if self._state != key:
            # only on a change: the context must not be touched between the flushing call and a capture, nor
            # before a replay (TensorRT, CUDA Graphs); the addresses are this slot's own and never change
            self._set_shapes(shapes)
            for t in self.inputs + self.outputs:
                ctx.set_tensor_address(t.name, self._device[t.name])
        out_shapes = {t.name: tuple(int(d) for d in ctx.get_tensor_shape(t.name)) for t in self.outputs}
        for name, shape in out_shapes.items():
            if int(np.prod(shape)) > self._capacity[name]:
                raise DfqError(f"output '{name}' of {self.label} has shape {list(shape)}, larger than its buffer: "
                               "an engine whose largest outputs are not at its largest inputs is not supported")
        cuda.event_record(ev[0], stream)
        for name, host in staged.items():
            cuda.htod_async(self._device[name], host, stream)
        cuda.event_record(ev[1], stream)
        self._engine_step(key, use_graph)
        cuda.event_record(ev[2], stream)
        results: dict[str, np.ndarray] = {}
        for t in self.outputs:
            shape = out_shapes[t.name]
            host = self._host[t.name].reshape(-1)[: int(np.prod(shape))].reshape(shape)
            cuda.dtoh_async(host, self._device[t.name], stream)
            results[t.name] = host
        cuda.event_record(ev[3], stream)
        cuda.event_sync(ev[3])
        results = {k: v.copy() for k, v in results.items()}  # the pinned buffers are reused next call
        return results, self._timing(key, t0)

    def run_device(self, feed: Mapping[str, Any], out_dtypes: Mapping[str, Any]) -> tuple[dict[str, Any],
                                                                                       InferTiming]:
        """Run torch CUDA tensors in place (their ``data_ptr``); outputs are new torch CUDA tensors. No graphs."""
        import torch

        t0 = time.perf_counter()
        cuda, ctx, ev, stream = self.cuda, self.context, self._events, self._stream
        shapes = {t.name: tuple(int(d) for d in feed[t.name].shape) for t in self.inputs}
        self._set_shapes(shapes)
        device = next(iter(feed.values())).device
        for t in self.inputs:
            ctx.set_tensor_address(t.name, int(feed[t.name].data_ptr()))
        outs = {}
        for t in self.outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(t.name))
            outs[t.name] = torch.empty(shape, dtype=out_dtypes[t.name], device=device)
            ctx.set_tensor_address(t.name, int(outs[t.name].data_ptr()))
        torch.cuda.current_stream(device).synchronize()  # the inputs are ready before the engine reads them
        for e in ev[:2]:
            cuda.event_record(e, stream)
        self._execute()
        # the context now holds torch addresses: the next staged call runs plainly before any capture
        self._state = None
        self._drop_graph()
        for e in ev[2:]:
            cuda.event_record(e, stream)
        cuda.event_sync(ev[3])
        return outs, self._timing(tuple(shapes[t.name] for t in self.inputs), t0)

    def _timing(self, key: Shapes, t0: float) -> InferTiming:
        ev, cuda = self._events, self.cuda
        return InferTiming(int(key[0][0]) if key and key[0] else 1, cuda.elapsed_ms(ev[0], ev[1]),
                           cuda.elapsed_ms(ev[1], ev[2]), cuda.elapsed_ms(ev[2], ev[3]),
                           1000 * (time.perf_counter() - t0))
