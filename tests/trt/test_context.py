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


def test_closing_wakes_waiters_with_a_clear_error() -> None:
    pool = SlotPool(lambda: Slot([]), max_slots=1)
    held = pool.acquire()
    errors: list[str] = []

    def wait() -> None:
        try:
            pool.acquire()
        except DfqError as exc:
            errors.append(str(exc))

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.05)
    pool.close()
    t.join(timeout=5)
    assert not t.is_alive() and errors and "closed" in errors[0]
    assert held.closed
    pool.release(held)  # releasing into a closed pool is harmless
    with pytest.raises(DfqError, match="closed"):
        pool.acquire()


def test_max_slots_must_be_positive() -> None:
    with pytest.raises(DfqError, match="max_contexts 0"):
        SlotPool(lambda: Slot([]), max_slots=0)
