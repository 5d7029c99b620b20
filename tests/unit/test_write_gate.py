"""The in-process SQLite writer queue: one writer at a time, alarms first."""

from __future__ import annotations

import threading
import time

from dispatch.store.db import WriteGate


def _wait_for(predicate, limit_s: float = 5.0) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def _writer(gate: WriteGate, urgent: bool, name: str, order: list[str]) -> threading.Thread:
    def run() -> None:
        gate.acquire(urgent)
        order.append(name)
        gate.release()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_urgent_writer_goes_before_ordinary_writers_that_waited_longer() -> None:
    """With the lock held, an SOS writer arriving last is let in first."""
    gate = WriteGate()
    order: list[str] = []
    gate.acquire(urgent=False)
    threads = [_writer(gate, False, "flush-1", order), _writer(gate, False, "flush-2", order)]
    _wait_for(lambda: gate.waiting == 2)
    threads.append(_writer(gate, True, "sos", order))
    _wait_for(lambda: gate.waiting == 3)
    assert order == []  # nobody writes while the lock is held
    gate.release()
    for thread in threads:
        thread.join(5)
    assert order[0] == "sos"
    assert sorted(order[1:]) == ["flush-1", "flush-2"]


def test_writers_never_overlap() -> None:
    """However many threads write, at most one is inside at a time and all get through."""
    gate = WriteGate()
    inside = 0
    peak = 0
    done = 0
    lock = threading.Lock()

    def run(urgent: bool) -> None:
        nonlocal inside, peak, done
        for _ in range(200):
            gate.acquire(urgent)
            with lock:
                inside += 1
                peak = max(peak, inside)
            with lock:
                inside -= 1
                done += 1
            gate.release()

    threads = [threading.Thread(target=run, args=(n % 2 == 0,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert (peak, done, gate.waiting) == (1, 1200, 0)
