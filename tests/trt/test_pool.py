"""The pool that lends each concurrent caller an execution context of its own, by profile, with real threads.

The slots here are plain objects (the pool holds anything with ``profile``, ``use_profile()`` and ``close()``);
the TensorRT contexts themselves are exercised by the GPU tests in test_engine.py.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dfq_deploy.errors import DfqError
from dfq_deploy.trt.pool import SlotPool


class Slot:
    def __init__(self, made: list[Slot], profile: int = 0) -> None:
        self.users = 0
        self.closed = False
        self.calls = 0
        self.profile = profile
        self.switched: list[int] = []
        made.append(self)

    def use_profile(self, index: int) -> None:
        self.switched.append(index)
        self.profile = index

    def close(self) -> None:
        self.closed = True


def _hammer(pool: SlotPool, overlaps: list[int], calls: int, profile: int = 0) -> None:
    for _ in range(calls):
        slot = pool.acquire(profile)
        try:
            assert slot.profile == profile
            slot.users += 1
            overlaps.append(slot.users)  # more than 1 would mean two callers share a context
            time.sleep(0.001)
            slot.calls += 1
            slot.users -= 1
        finally:
            pool.release(slot)


def test_each_concurrent_caller_gets_its_own_slot() -> None:
    made: list[Slot] = []
    pool = SlotPool(lambda p: Slot(made, p))
    overlaps: list[int] = []
    threads = [threading.Thread(target=_hammer, args=(pool, overlaps, 20)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(overlaps) == 1 and len(overlaps) == 80
    assert 1 <= pool.size <= 4 and pool.size == len(made)  # never more slots than callers at once
    assert sum(s.calls for s in made) == 80
    pool.close()
    assert all(s.closed for s in made) and pool.size == 0


def test_one_thread_reuses_one_slot() -> None:
    made: list[Slot] = []
    pool = SlotPool(lambda p: Slot(made, p))
    _hammer(pool, [], 10)
    assert pool.size == 1 and made[0].calls == 10


def test_max_slots_caps_contexts_and_callers_wait() -> None:
    made: list[Slot] = []
    pool = SlotPool(lambda p: Slot(made, p), max_slots=2)
    overlaps: list[int] = []
    with ThreadPoolExecutor(6) as ex:
        for f in [ex.submit(_hammer, pool, overlaps, 5) for _ in range(6)]:
            f.result()
    assert pool.size == 2 and max(overlaps) == 1 and sum(s.calls for s in made) == 30


def test_closing_wakes_waiters_and_waits_for_calls_still_running() -> None:
    pool = SlotPool(lambda p: Slot([], p), max_slots=1)
    held = pool.acquire()
    errors: list[str] = []

    def wait() -> None:
        try:
            pool.acquire()
        except DfqError as exc:
            errors.append(str(exc))

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.05)
    closer = threading.Thread(target=pool.close)
    closer.start()
    waiter.join(timeout=5)
    assert not waiter.is_alive() and errors and "closed" in errors[0]
    time.sleep(0.05)
    assert closer.is_alive() and not held.closed  # a borrowed slot is not freed under its call
    pool.release(held)  # the call returns: now it is closed, and close() finishes
    closer.join(timeout=5)
    assert not closer.is_alive() and held.closed and pool.size == 0
    with pytest.raises(DfqError, match="closed"):
        pool.acquire()


def test_close_gives_up_on_a_call_that_never_returns() -> None:
    pool = SlotPool(lambda p: Slot([], p))
    held = pool.acquire()
    t0 = time.monotonic()
    pool.close(timeout=0.1)
    assert held.closed and time.monotonic() - t0 < 5


def test_a_context_that_does_not_fit_makes_callers_wait() -> None:
    made: list[Slot] = []

    def factory(profile: int) -> Slot:
        if len(made) == 2:
            raise DfqError("could not create an execution context (out of GPU memory?)")
        return Slot(made, profile)

    pool = SlotPool(factory)
    overlaps: list[int] = []
    with ThreadPoolExecutor(4) as ex:
        for f in [ex.submit(_hammer, pool, overlaps, 5) for _ in range(4)]:
            f.result()
    assert pool.size == 2 and pool.max_slots == 2 and max(overlaps) == 1
    failing = SlotPool(factory)  # the first context failing is the caller's error
    made.clear()
    made.extend([Slot([]), Slot([])])
    with pytest.raises(DfqError, match="out of GPU memory"):
        failing.acquire()


def test_max_slots_must_be_positive() -> None:
    with pytest.raises(DfqError, match="max_contexts 0"):
        SlotPool(lambda p: Slot([], p), max_slots=0)


# --- profiles ----------------------------------------------------------------------------------------------
def test_one_thread_gets_a_context_per_profile_and_never_switches() -> None:
    """A single-threaded app alternating batch sizes: one context per profile, each kept on its profile."""
    made: list[Slot] = []
    pool = SlotPool(lambda p: Slot(made, p), num_profiles=4)
    for profile in (1, 1, 3, 3, 1, 0, 3, 0, 2):
        pool.release(pool.acquire(profile))
    assert sorted(s.profile for s in made) == [0, 1, 2, 3] and pool.size == 4
    assert pool.switches == 0 and all(not s.switched for s in made)


def test_at_the_cap_a_free_context_switches_profile() -> None:
    made: list[Slot] = []
    pool = SlotPool(lambda p: Slot(made, p), max_slots=1, num_profiles=4)
    for profile in (1, 1, 3, 1):
        slot = pool.acquire(profile)
        assert slot.profile == profile
        pool.release(slot)
    assert pool.size == 1 and made[0].switched == [3, 1] and pool.switches == 2


def test_contexts_beyond_the_profile_count_only_for_concurrency() -> None:
    """With free contexts on other profiles and as many contexts as profiles, a caller switches one."""
    made: list[Slot] = []
    pool = SlotPool(lambda p: Slot(made, p), num_profiles=2)
    a, b = pool.acquire(0), pool.acquire(0)  # two callers at once on profile 0: two contexts
    pool.release(a)
    pool.release(b)
    c = pool.acquire(1)  # two contexts, two profiles, both free: switch one, make none
    assert pool.size == 2 and c.profile == 1 and pool.switches == 1
    pool.release(c)


def test_shared_profiles_run_concurrently_and_exclusive_ones_wait() -> None:
    for share, most in ((True, 4), (False, 1)):
        made: list[Slot] = []
        pool = SlotPool(lambda p, made=made: Slot(made, p), num_profiles=2, share_profiles=share)
        busy: list[int] = []
        lock = threading.Lock()
        peak = [0]

        def call(pool: SlotPool = pool, busy: list[int] = busy, lock: threading.Lock = lock,
                 peak: list[int] = peak) -> None:
            for _ in range(5):
                slot = pool.acquire(1)
                with lock:
                    busy.append(1)
                    peak[0] = max(peak[0], len(busy))
                time.sleep(0.02)  # long enough for the other threads to arrive
                with lock:
                    busy.pop()
                pool.release(slot)

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 1 <= peak[0] <= most and (peak[0] > 1) == share, (share, peak)
        pool.close()


def test_a_failed_switch_returns_the_slot_and_raises() -> None:
    class Stuck(Slot):
        def use_profile(self, index: int) -> None:
            raise DfqError("TensorRT could not switch to optimisation profile 1")

    made: list[Slot] = []
    pool = SlotPool(lambda p: Stuck(made, p), max_slots=1, num_profiles=2)
    pool.release(pool.acquire(0))
    with pytest.raises(DfqError, match="could not switch"):
        pool.acquire(1)
    assert pool.acquire(0) is made[0]  # back in the pool, still on profile 0
