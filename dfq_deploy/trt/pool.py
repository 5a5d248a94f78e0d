"""The pool of execution contexts an engine lends its callers, one per concurrent call, by optimisation profile.

What TensorRT says about contexts and profiles (NvInferRuntime.h, NvInfer.h and the Python binding docstrings at
NVIDIA/TensorRT release/10.3 and 11.1):

* "The TensorRT runtime can be used by multiple threads simultaneously, so long as each object uses a different
  execution context" (Developer Guide, Thread Safety): one caller per context at a time, which this pool ensures.
* A context runs one profile at a time: "The selected profile will be used in subsequent calls to
  executeV2()/enqueueV3() ... The newly created execution context will be assigned optimization profile 0", and
  ``setOptimizationProfileAsync`` "will trigger layer resource updates on the next call of executeV2()/enqueueV3(),
  possibly resulting in performance bottlenecks". So a context keeps its profile while it can: a caller gets a
  free context already on its profile first, and a context switches only when none is free and no new one may be
  made.
* Sharing one profile between contexts in concurrent use: the ``IExecutionContext`` class comment (still in 10.3
  and 11.1) says "each execution context in concurrent use must use a separate optimization profile", but the
  preview feature ``kPROFILE_SHARING_0806`` "Allows optimization profiles to be shared across execution contexts"
  and is "Deprecated in TensorRT 10.0. The default value for this flag is on and can not be changed" (NvInfer.h
  10.3; Python ``PreviewFeature.PROFILE_SHARING_0806``: "[DEPRECATED] ... The default value for this flag is on in
  TensorRT 10.0"), and trtexec 10.3 puts all ``--infStreams`` contexts on the one ``--useProfile``
  (``samples/common/sampleInference.cpp``). dfq-deploy needs TensorRT >= 10.0, so contexts share profiles by
  default; ``share_profiles=False`` follows the class comment literally (one caller per profile at a time).

Sizing: a single-threaded app gets one context per profile it uses (no switching), a server with N threads about
N; at most ``max(N, number of profiles)`` and never more than ``max_slots``. Each context holds its own activation
memory, so ``max_slots`` bounds GPU memory; when making one more fails (out of memory on a small board) the pool
stops growing and callers switch or wait instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any

from dfq_deploy.errors import DfqError

logger = logging.getLogger(__name__)


class SlotPool:
    """Lends one slot to each concurrent caller, on the optimisation profile the caller asks for.

    ``acquire(profile)`` takes, in this order: a free slot already on ``profile``; a new slot (while fewer than
    ``max_slots`` exist, and either none is free or there are fewer slots than profiles); a free slot on another
    profile, switched with its ``use_profile(profile)`` outside the pool's lock; else it waits for a release. Works
    on any objects with ``profile``, ``use_profile(index)`` and ``close()``.

    Args:
        factory: ``factory(profile)`` makes a new slot on that profile (called under the pool's lock, one at a
            time).
        max_slots: most slots at once (None: as the callers need, see the module docstring).
        num_profiles: the engine's profile count.
        share_profiles: allow several callers on one profile at once (TensorRT >= 10.0); False: one at a time.
    """

    def __init__(self, factory: Any, max_slots: int | None = None, num_profiles: int = 1,
                 share_profiles: bool = True) -> None:
        if max_slots is not None and max_slots < 1:
            raise DfqError(f"max_contexts {max_slots}: must be at least 1 (or None for one per thread)")
        self._factory, self.max_slots = factory, max_slots
        self.num_profiles, self.share_profiles = max(1, int(num_profiles)), share_profiles
        self._free: list[Any] = []
        self._all: list[Any] = []
        self._lent: dict[int, int] = {}  # id(slot) -> the profile it was lent for
        self._cond = threading.Condition()
        self._closed = False
        self.switches = 0

    @property
    def size(self) -> int:
        """Slots made so far."""
        return len(self._all)

    @property
    def slots(self) -> list[Any]:
        return list(self._all)

    def _take(self, profile: int) -> tuple[Any, bool] | None:
        """Under the lock: ``(slot, needs a switch)``, or None to wait."""
        if not self.share_profiles and profile in Counter(self._lent.values()):
            return None
        for i, slot in enumerate(self._free):
            if slot.profile == profile:
                return self._free.pop(i), False
        can_grow = self.max_slots is None or len(self._all) < self.max_slots
        if can_grow and (not self._free or len(self._all) < self.num_profiles):
            try:
                slot = self._factory(profile)
            except DfqError as exc:
                if not self._all:
                    raise
                self.max_slots = len(self._all)
                logger.warning("could not make execution context %d (%s): staying at %d, callers switch or wait",
                               len(self._all) + 1, exc, len(self._all))
                return self._take(profile)
            self._all.append(slot)
            return slot, False
        if self._free:
            return self._free.pop(), True
        return None

    def acquire(self, profile: int = 0) -> Any:
        """A slot on ``profile`` for the caller alone, until :meth:`release`.

        Raises:
            DfqError: the pool is closed, the first slot could not be made, or switching a slot failed.
        """
        with self._cond:
            while True:
                if self._closed:
                    raise DfqError("the engine was closed: open it again to run it")
                taken = self._take(profile)
                if taken is not None:
                    slot, switch = taken
                    self._lent[id(slot)] = profile
                    break
                self._cond.wait()
        if switch:
            try:
                slot.use_profile(profile)
            except BaseException:
                self.release(slot)
                raise
            with self._cond:
                self.switches += 1
        return slot

    def release(self, slot: Any) -> None:
        with self._cond:
            self._lent.pop(id(slot), None)
            if self._closed:  # the pool closed while this call ran: the slot is closed now that it is back
                slot.close()
                self._all = [s for s in self._all if s is not slot]
                self._cond.notify_all()
                return
            self._free.append(slot)
            self._cond.notify_all()  # waiters differ by profile: let each look again

    def close(self, timeout: float = 30.0) -> None:
        """Close every slot: the free ones now, the borrowed ones as their calls return (up to ``timeout``)."""
        with self._cond:
            self._closed = True
            free, self._free = self._free, []
            self._all = [s for s in self._all if s not in free]
            self._cond.notify_all()
        for slot in free:
            slot.close()
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._all and time.monotonic() < deadline:
                self._cond.wait(timeout=max(0.0, deadline - time.monotonic()))
            left, self._all = self._all, []
        if left:
            logger.warning("%d execution context(s) still in use after %.0f s: closing them anyway", len(left),
                           timeout)
            for slot in left:
                slot.close()
