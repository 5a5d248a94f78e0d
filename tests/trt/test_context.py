"""The pool that lends each concurrent caller an execution context of its own, with real threads.

The slots here are plain objects (the pool holds anything with ``close()``); the TensorRT contexts themselves
are exercised by the GPU tests in test_engine.py.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dfq_deploy.errors import DfqError
from dfq_deploy.trt.context import SlotPool


class Slot:
    def __init__(self, made: list[Slot]) -> None:
        self.users = 0
        self.closed = False
        self.calls = 0
        made.append(self)

    def close(self) -> None:
        self.closed = True


def _hammer(pool: SlotPool, overlaps: list[int], calls: int) -> None:
    for _ in range(calls):
        slot = pool.acquire()
        try:
            slot.users += 1
            overlaps.append(slot.users)  # more than 1 would mean two callers share a context
            time.sleep(0.001)
            slot.calls += 1
            slot.users -= 1
        finally:
            pool.release(slot)


def test_each_concurrent_caller_gets_its_own_slot() -> None:
    made: list[Slot] = []
    pool = SlotPool(lambda: Slot(made))
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
    pool = SlotPool(lambda: Slot(made))
    _hammer(pool, [], 10)
    assert pool.size == 1 and made[0].calls == 10


def test_max_slots_caps_contexts_and_callers_wait() -> None:
    made: list[Slot] = []
    pool = SlotPool(lambda: Slot(made), max_slots=2)
    overlaps: list[int] = []
    with ThreadPoolExecutor(6) as ex:
        for f in [ex.submit(_hammer, pool, overlaps, 5) for _ in range(6)]:
            f.result()
    assert pool.size == 2 and max(overlaps) == 1 and sum(s.calls for s in made) == 30


def test_closing_wakes_waiters_and_waits_for_calls_still_running() -> None:
    pool = SlotPool(lambda: Slot([]), max_slots=1)
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
    pool = SlotPool(lambda: Slot([]))
    held = pool.acquire()
    t0 = time.monotonic()
    pool.close(timeout=0.1)
    assert held.closed and time.monotonic() - t0 < 5


def test_a_context_that_does_not_fit_makes_callers_wait() -> None:
    made: list[Slot] = []

    def factory() -> Slot:
        if len(made) == 2:
            raise DfqError("could not create an execution context (out of GPU memory?)")
        return Slot(made)

    pool = SlotPool(factory)
    overlaps: list[int] = []
    with ThreadPoolExecutor(4) as ex:
        for f in [ex.submit(_hammer, pool, overlaps, 5) for _ in range(4)]:
            f.result()
    assert pool.size == 2 and pool.max_slots == 2 and max(overlaps) == 1
    failing = SlotPool(lambda: factory())  # the first context failing is the caller's error
    made.clear()
    made.extend([Slot([]), Slot([])])
    with pytest.raises(DfqError, match="out of GPU memory"):
        failing.acquire()


def test_max_slots_must_be_positive() -> None:
    with pytest.raises(DfqError, match="max_contexts 0"):
        SlotPool(lambda: Slot([]), max_slots=0)
