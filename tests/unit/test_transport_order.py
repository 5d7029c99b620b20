"""TerminalStreamProtocol: reply order, hold-back behind a waiting outcome, writes, memory.

A stub gateway decides each frame's outcome (answered at once, or a Deferred the test
fires later), so these tests pin what the transport itself guarantees, whatever the
gateway does: replies leave in arrival order, a frame waiting for its outcome holds back
every later frame, decode errors of a read are answered before that read's frames.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from dispatch import events as ev
from dispatch.protocol import native_format as fmt
from dispatch.protocol.base import Inbound, Outcome
from dispatch.protocol.native import NativeCodec
from dispatch.protocol.transport import LOGIN_TIMEOUT_S, TerminalStreamProtocol
from simulators.native_codec import NativeTerminalCodec

IDENT = "860000000000001"
NOW = 1_700_000_000.0


class Device:
    ident = IDENT


class StubGateway:
    """Answers heartbeats at once; SOS outcomes wait until the test fires them."""

    def __init__(self) -> None:
        self.handled: list[str] = []
        self.pending: list[defer.Deferred[Outcome]] = []
        self.fail_on: set[int] = set()  # heartbeat batteries whose handling raises

    def handle(self, link: Any, inbound: Inbound) -> Outcome | defer.Deferred[Outcome]:
        event = inbound.event
        name = type(event).__name__
        if isinstance(event, ev.Heartbeat):
            name += f"({event.battery})"
            if event.battery in self.fail_on:
                self.handled.append(name)
                raise RuntimeError("handler bug")
        self.handled.append(name)
        if isinstance(event, ev.Login):
            link.device = Device()
            return defer.succeed(Outcome.accept(NOW))
        if isinstance(event, ev.Sos):
            d: defer.Deferred[Outcome] = defer.Deferred()
            self.pending.append(d)
            return d
        return Outcome.accept(NOW)

    def after_login(self, link: Any) -> None:
        link.send_command(ev.Settings(60, ("+8613800000001",)))

    def unbind(self, link: Any) -> None:
        pass


class CountingTransport(StringTransport):
    """Counts transport.write calls (coalescing is about their number)."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "10.0.0.7", 40000))
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


class Conn:
    def __init__(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.gateway = StubGateway()
        self.sim = NativeTerminalCodec(IDENT)
        self.transport = CountingTransport()
        self.proto = TerminalStreamProtocol(NativeCodec(), self.gateway, self.clock)
        self.proto.makeConnection(self.transport)

    def replies(self) -> list[str]:
        """Reply kinds written since the last call, e.g. ``ack:heartbeat``."""
        out = self.transport.value()
        self.transport.clear()
        kinds = []
        for r in self.sim.feed(out):
            kind = r["type"]
            kinds.append(f"{kind}:{r['key'][0]}" if kind in ("ack", "nack") else kind)
        return kinds

    def beat(self, battery: int) -> bytes:
        return self.sim.heartbeat(battery, False, 70)

    def sos(self) -> bytes:
        return self.sim.sos(ev.SosTrigger.BUTTON, None, NOW, 50)[0]


def unknown_type_frame(seq: int = 9) -> bytes:
    head = struct.pack(">BHB16sI", 1, 1, 0x10, IDENT.encode().ljust(16, b"\0"), seq)
    return fmt.MAGIC + head + b"\0" + fmt.crc16(head + b"\0").to_bytes(2, "big")


@pytest.fixture
def conn() -> Conn:
    c = Conn()
    c.proto.dataReceived(c.sim.login())
    assert c.replies() == ["login_ack", "settings"]
    c.gateway.handled.clear()
    c.transport.writes = 0
    return c


def test_waiting_sos_holds_back_later_frames_until_answered(conn: Conn) -> None:
    """Frames behind an SOS whose commit is pending are not even handled until it is done."""
    conn.proto.dataReceived(conn.sos() + conn.beat(1))
    conn.proto.dataReceived(conn.beat(2))
    assert conn.replies() == []
    assert conn.gateway.handled == ["Sos"]
    conn.gateway.pending[0].callback(Outcome.accept(NOW))
    assert conn.replies() == ["ack:sos", "ack:heartbeat", "ack:heartbeat"]
    assert conn.gateway.handled == ["Sos", "Heartbeat(1)", "Heartbeat(2)"]
    assert conn.proto._queue is None  # drained: the deque is dropped again


def test_second_sos_behind_first_waits_for_its_own_commit(conn: Conn) -> None:
    """Two waiting outcomes in a row: each holds back what follows it."""
    conn.proto.dataReceived(conn.beat(1) + conn.sos() + conn.beat(2) + conn.sos() + conn.beat(3))
    assert conn.replies() == ["ack:heartbeat"]
    conn.gateway.pending[0].callback(Outcome.accept(NOW))
    assert conn.replies() == ["ack:sos", "ack:heartbeat"]
    assert conn.gateway.handled[-1] == "Sos"
    conn.gateway.pending[1].callback(Outcome.reject(ev.Reject.TRY_LATER, NOW))
    assert conn.replies() == ["nack:sos", "ack:heartbeat"]


def test_failed_outcome_gets_no_reply_and_releases_later_frames(conn: Conn) -> None:
    """A Deferred that fails is logged, not answered, and the frames behind it go on."""
    conn.proto.dataReceived(conn.sos() + conn.beat(1))
    conn.gateway.pending[0].errback(RuntimeError("store down"))
    assert conn.replies() == ["ack:heartbeat"]


def test_decode_errors_are_answered_before_the_frames_of_the_same_read(conn: Conn) -> None:
    """An unknown-type NACK is written before the ACK of a heartbeat that came before it."""
    conn.proto.dataReceived(conn.beat(1) + unknown_type_frame() + conn.beat(2))
    assert conn.replies() == ["nack:16", "ack:heartbeat", "ack:heartbeat"]


def test_fatal_noise_drops_the_frames_of_the_same_read_unhandled(conn: Conn) -> None:
    """A read ending in fatal noise closes the connection; its good frames are not handled."""
    conn.proto.dataReceived(conn.beat(1) + b"\0" * 5000)
    assert conn.gateway.handled == []
    assert conn.replies() == []
    assert conn.transport.disconnecting


def test_replies_of_one_read_are_one_write_in_order() -> None:
    """LOGIN + HEARTBEATs in one read: ACK, SETTINGS, ACKs, written with one write."""
    c = Conn()
    c.proto.dataReceived(c.sim.login() + c.beat(1) + c.beat(2))
    assert c.transport.writes == 1
    assert c.replies() == ["login_ack", "settings", "ack:heartbeat", "ack:heartbeat"]


def test_single_frame_read_is_answered_with_one_write(conn: Conn) -> None:
    conn.proto.dataReceived(conn.beat(1))
    assert conn.transport.writes == 1
    assert conn.replies() == ["ack:heartbeat"]


def test_close_during_a_read_writes_what_was_answered_first(conn: Conn) -> None:
    """Replies collected before a close in the same read still go out, before the close."""
    conn.proto.dataReceived(conn.beat(1) + unknown_type_frame() + b"\0" * 5000)
    assert conn.replies() == ["nack:16"]
    assert conn.transport.disconnecting
    assert conn.gateway.handled == []


def test_handler_error_keeps_the_later_frames_of_its_read_for_the_next(conn: Conn) -> None:
    """If the gateway raises, the frames after the failed one are answered on the next read."""
    conn.gateway.fail_on.add(2)
    with pytest.raises(RuntimeError):
        conn.proto.dataReceived(conn.beat(1) + conn.beat(2) + conn.beat(3))
    assert conn.replies() == ["ack:heartbeat"]
    conn.proto.dataReceived(conn.beat(4))
    assert conn.replies() == ["ack:heartbeat", "ack:heartbeat"]
    assert conn.gateway.handled == ["Heartbeat(1)", "Heartbeat(2)", "Heartbeat(3)", "Heartbeat(4)"]


def test_login_drops_the_cancelled_timer_and_no_queue_is_kept() -> None:
    """After login no timer is pending or referenced, and no queue exists between frames."""
    c = Conn()
    assert c.proto._queue is None
    assert len(c.clock.getDelayedCalls()) == 1
    c.proto.dataReceived(c.sim.login())
    assert c.clock.getDelayedCalls() == []
    assert c.proto._login_timer is None
    c.proto.dataReceived(c.beat(1))
    assert c.proto._queue is None
    c.clock.advance(LOGIN_TIMEOUT_S + 1)
    assert not c.transport.disconnecting


def test_login_timeout_still_closes_a_silent_connection() -> None:
    c = Conn()
    c.clock.advance(LOGIN_TIMEOUT_S + 1)
    assert c.transport.disconnecting
    assert c.proto._login_timer is None
