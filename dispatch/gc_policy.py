"""Keep long-lived objects out of the garbage collector's full passes.

A full (generation 2) collection walks every tracked object.  With 19,000
terminal sessions that is ~385,000 objects and a 300-350 ms stop of the
reactor, during which SOS frames wait (docs/performance.md).  The objects of
start-up (modules, ORM mappers) and of settled sessions live until shutdown,
so once they are in place :func:`gc.freeze` moves them to the permanent
generation and later full passes walk only what is new.

The price: cyclic garbage among frozen objects is never collected.  That is
safe here because a session's teardown leaves no reference cycle (pinned by
``tests/unit/test_gc_policy.py``), and freezing happens only after a young
collection, when a wave of logins has settled.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import task

from dispatch import logs, metrics

log = logs.get(__name__)

CHECK_EVERY_S = 5.0
GROWTH_TO_FREEZE = 1_000
SETTLED_CHANGE = 0.01


class GcPauseObserver:
    """Times every collection into ``dispatch_gc_pause_seconds{generation}``."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        """A ``gc.callbacks`` hook: phase is 'start' or 'stop'."""
        if phase == "start":
            self._started = self._clock()
        else:
            metrics.GC_PAUSE_SECONDS.labels(str(info["generation"])).observe(
                self._clock() - self._started
            )

    def install(self) -> None:
        """Add the hook (once)."""
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def remove(self) -> None:
        """Take the hook out again."""
        if self in gc.callbacks:
            gc.callbacks.remove(self)


class FreezePolicy:
    """Freeze once after start-up, then whenever a login wave has settled.

    ``sessions`` reads how many devices are online; a wave has settled when the
    count is at least ``GROWTH_TO_FREEZE`` above its lowest point since the last
    freeze (so a reconnect storm after an outage counts as a new wave) and moved
    less than ``SETTLED_CHANGE`` over the last check interval.
    """

    def __init__(
        self,
        clock: Any,
        sessions: Callable[[], int],
        *,
        collect: Callable[[int], int] = gc.collect,
        freeze: Callable[[], None] = gc.freeze,
        frozen: Callable[[], int] = gc.get_freeze_count,
    ) -> None:
        self.clock = clock
        self.sessions = sessions
        self._collect = collect
        self._freeze = freeze
        self._frozen = frozen
        self._low_since_freeze = 0
        self._at_last_check = 0
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = clock

    def start(self) -> None:
        """Freeze what start-up built and begin watching for settled waves."""
        # Start-up is not latency-sensitive: one full pass first, so no garbage is frozen.
        self._collect(2)
        self._freeze_now("startup")
        self._loop.start(CHECK_EVERY_S, now=False)

    def stop(self) -> None:
        """Stop watching."""
        if self._loop.running:
            self._loop.stop()

    def check(self) -> None:
        """One check: freeze if a wave of logins has settled since the last freeze."""
        now = self.sessions()
        previous, self._at_last_check = self._at_last_check, now
        self._low_since_freeze = min(self._low_since_freeze, now)
        grown = now - self._low_since_freeze
        settled = abs(now - previous) <= max(1, now * SETTLED_CHANGE)
        if grown >= GROWTH_TO_FREEZE and settled:
            # A young pass (cheap) so the wave's own short-lived cycles are not frozen.
            self._collect(1)
            self._freeze_now("sessions_settled")

    def _freeze_now(self, reason: str) -> None:
        self._freeze()
        sessions = self._low_since_freeze = self.sessions()
        frozen = self._frozen()
        metrics.GC_FROZEN_OBJECTS.set(frozen)
        log.info("gc_frozen", reason=reason, objects=frozen, sessions=sessions)
