"""The garbage-collector policy: when it freezes, and why freezing leaks nothing.

Freezing is only safe if objects that die after a freeze die by reference
counting.  A terminal session is the object that comes and goes all day, so
the second half pins that a session's whole life — login, heartbeats, SOS,
disconnect — leaves no reference cycle behind.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from dispatch import events as ev
from dispatch.gateway import Gateway
from dispatch.gc_policy import CHECK_EVERY_S, GROWTH_TO_FREEZE, FreezePolicy, GcPauseObserver
from dispatch.livestate import LiveState
from dispatch.protocol.native import NativeCodec
from dispatch.protocol.transport import TerminalStreamProtocol
from simulators.native_codec import NativeTerminalCodec
from tests.unit.fakes import SyncDatabase, seed_subscriber

START = 1_700_000_000.0


class FakeGc:
    """Records what the policy asks of the collector."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def collect(self, generation: int) -> int:
        self.calls.append(f"collect{generation}")
        return 0

    def freeze(self) -> None:
        self.calls.append("freeze")

    def frozen(self) -> int:
        return self.calls.count("freeze")


@pytest.fixture
def policy() -> Iterator[tuple[FreezePolicy, FakeGc, task.Clock, list[int]]]:
    clock = task.Clock()
    fake = FakeGc()
    online = [0]
    p = FreezePolicy(
        clock, lambda: online[0], collect=fake.collect, freeze=fake.freeze, frozen=fake.frozen
    )
    p.start()
    yield p, fake, clock, online
    p.stop()


def test_startup_collects_fully_then_freezes(policy) -> None:
    """Start-up objects are frozen after a full pass, so no garbage is frozen with them."""
    _p, fake, _clock, _online = policy
    assert fake.calls == ["collect2", "freeze"]


def test_no_freeze_while_sessions_keep_arriving(policy) -> None:
    """During a login ramp the count keeps moving: nothing is frozen mid-wave."""
    _p, fake, clock, online = policy
    fake.calls.clear()
    for step in range(1, 11):
        online[0] = step * 2_000
        clock.advance(CHECK_EVERY_S)
    assert fake.calls == []


def test_settled_wave_is_frozen_once(policy) -> None:
    """Once the count stops moving, a young pass and a freeze; then nothing more."""
    _p, fake, clock, online = policy
    fake.calls.clear()
    online[0] = 19_000
    clock.advance(CHECK_EVERY_S)  # still moving (0 -> 19,000)
    assert fake.calls == []
    online[0] = 19_050  # < 1 % change: settled
    clock.advance(CHECK_EVERY_S)
    assert fake.calls == ["collect1", "freeze"]
    for _ in range(10):
        clock.advance(CHECK_EVERY_S)
    assert fake.calls == ["collect1", "freeze"]


def test_small_growth_is_not_worth_a_freeze(policy) -> None:
    """Fewer new sessions than GROWTH_TO_FREEZE never trigger a freeze."""
    _p, fake, clock, online = policy
    fake.calls.clear()
    online[0] = GROWTH_TO_FREEZE - 1
    for _ in range(5):
        clock.advance(CHECK_EVERY_S)
    assert fake.calls == []


def test_reconnect_storm_after_outage_is_a_new_wave(policy) -> None:
    """Sessions drop to zero and come back: the returning wave is frozen again."""
    _p, fake, clock, online = policy
    online[0] = 5_000
    clock.advance(CHECK_EVERY_S)
    clock.advance(CHECK_EVERY_S)
    assert fake.calls.count("freeze") == 2
    online[0] = 0
    clock.advance(CHECK_EVERY_S)
    online[0] = 5_000
    clock.advance(CHECK_EVERY_S)
    clock.advance(CHECK_EVERY_S)
    assert fake.calls.count("freeze") == 3


def test_pause_observer_times_each_pass_by_generation() -> None:
    """The gc callback turns start/stop pairs into histogram observations."""
    from prometheus_client import REGISTRY

    def count() -> float:
        labels = {"generation": "1"}
        return REGISTRY.get_sample_value("dispatch_gc_pause_seconds_count", labels) or 0.0

    ticks = iter([10.0, 10.25])
    observer = GcPauseObserver(clock=lambda: next(ticks))
    before = count()
    observer("start", {"generation": 1})
    observer("stop", {"generation": 1})
    assert count() == before + 1
    total = REGISTRY.get_sample_value("dispatch_gc_pause_seconds_sum", {"generation": "1"})
    assert total is not None and total >= 0.25


# --- sessions leave no cycles ------------------------------------------------------------

IDENT = "860000000000001"


@pytest.fixture
def db(sqlite_url: str) -> Iterator[SyncDatabase]:
    database = SyncDatabase(sqlite_url)
    seed_subscriber(database, IDENT, phones=("+8613800000001",))
    yield database
    database.stop()


def _session_life(gateway: Gateway, clock: task.Clock) -> None:
    """One terminal's whole connection, as the reactor would drive it."""
    sim = NativeTerminalCodec(IDENT)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.7", 40001))
    proto = TerminalStreamProtocol(NativeCodec(), gateway, clock)
    proto.makeConnection(transport)
    proto.dataReceived(sim.login())
    for battery in (80, 79, 78):
        clock.advance(60)
        proto.dataReceived(sim.heartbeat(battery, False, 70))
    frame, _key = sim.sos(ev.SosTrigger.BUTTON, None, int(clock.seconds()), 78)
    proto.dataReceived(frame)
    assert sim.feed(transport.value())  # the server did answer
    # What twisted.internet.tcp.Connection does when the socket closes.
    proto.connectionLost(Failure(ConnectionDone()))


def test_a_session_leaves_no_reference_cycle(db: SyncDatabase) -> None:
    """Login, heartbeats, SOS, disconnect: every session object dies by reference count."""
    clock = task.Clock()
    clock.advance(START)
    gateway = Gateway(clock, db, LiveState(180))
    _session_life(gateway, clock)  # warm caches (metric children, compiled parsers)
    ours = (TerminalStreamProtocol, NativeCodec, StringTransport)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            _session_life(gateway, clock)
        gc.collect()
        leaked = [type(o).__name__ for o in gc.garbage if isinstance(o, ours)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.collect()
    assert leaked == []
    assert IDENT not in gateway.links
