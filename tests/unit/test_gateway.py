"""Gateway, live state and the native TCP/UDP transports over in-memory transports.

Terminal frames come from the simulator's codec and server replies are parsed
with it, so these tests speak the wire protocol of docs/protocol.md.  Storage is
a real SQLite file behind :class:`tests.unit.fakes.SyncDatabase`; time is a
:class:`twisted.internet.task.Clock`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from dispatch import events as ev
from dispatch import livestate
from dispatch.app import DispatchApp
from dispatch.config import Config
from dispatch.gateway import Gateway
from dispatch.http.router import ApiRequest
from dispatch.livestate import DeviceLive, LiveState, LiveStateFlusher
from dispatch.protocol import native_format as fmt
from dispatch.protocol import transport as transport_mod
from dispatch.protocol.native import NativeCodec
from dispatch.protocol.native_format import MsgType
from dispatch.protocol.native_udp import NativeDatagramProtocol, UdpLink
from dispatch.protocol.transport import TerminalStreamProtocol
from dispatch.store.models import Device, EventLog, Incident, SosFrame, TimelineEntry
from simulators.native_codec import NativeTerminalCodec
from tests.unit.fakes import SyncDatabase, seed_many, seed_subscriber

IDENT = "860000000000001"
PHONES = ("+8613800000001", "+8613800000002")
START = 1_700_000_000.0
HEARTBEAT = 60
OFFLINE_AFTER = 3
SILENCE = HEARTBEAT * OFFLINE_AFTER
WENZHOU = ev.Location(27.994, 120.699, 15)


# --- helpers ------------------------------------------------------------------------


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    """Current value of a process-global metric sample (0 if never touched)."""
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


class Delta:
    """Reads a metric now and reports how much it moved later."""

    def __init__(self, name: str, labels: dict[str, str] | None = None) -> None:
        self.name, self.labels = name, labels
        self.before = sample(name, labels)

    @property
    def value(self) -> float:
        return sample(self.name, self.labels) - self.before


def raw_frame(msg_type: int, payload: bytes, ident: str = IDENT, seq: int = 1) -> bytes:
    """A well-framed frame (good CRC) of any type, including ones the server does not know."""
    head = struct.pack(">BHB16sI", 1, len(payload), msg_type, ident.encode().ljust(16, b"\0"), seq)
    return fmt.MAGIC + head + payload + fmt.crc16(head + payload).to_bytes(2, "big")


class SpyTransport(StringTransport):
    """A StringTransport that calls a hook before each write (to see state at reply time)."""

    def __init__(self, peer_port: int, on_write: Callable[[bytes], None] | None = None) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "10.0.0.7", peer_port))
        self.on_write = on_write

    def write(self, data: bytes) -> None:
        if self.on_write is not None:
            self.on_write(data)
        super().write(data)


class Terminal:
    """One simulated terminal on one in-memory TCP connection."""

    _ports = iter(range(40000, 50000))

    def __init__(
        self,
        gateway: Gateway,
        clock: Any,
        ident: str = IDENT,
        codec: NativeTerminalCodec | None = None,
        on_write: Callable[[bytes], None] | None = None,
    ) -> None:
        self.sim = codec or NativeTerminalCodec(ident)
        self.transport = SpyTransport(next(self._ports), on_write)
        self.proto = TerminalStreamProtocol(NativeCodec(), gateway, clock)
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> list[dict[str, Any]]:
        """Deliver bytes to the server; return the frames it wrote back."""
        self.proto.dataReceived(data)
        return self.replies()

    def replies(self) -> list[dict[str, Any]]:
        out = self.transport.value()
        self.transport.clear()
        return self.sim.feed(out)

    def login(self) -> list[dict[str, Any]]:
        return self.send(self.sim.login())

    def heartbeat(self, battery: int = 80, signal: int = 70, charging: bool = False):
        return self.send(self.sim.heartbeat(battery, charging, signal))

    def lose(self) -> None:
        """The connection goes away (what the reactor does after loseConnection)."""
        self.proto.connectionLost(Failure(ConnectionDone()))

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


def types(replies: list[dict[str, Any]]) -> list[str]:
    return [r["type"] for r in replies]


# --- fixtures -----------------------------------------------------------------------


@pytest.fixture
def db(sqlite_url: str) -> Iterator[SyncDatabase]:
    database = SyncDatabase(sqlite_url)
    yield database
    database.stop()


@pytest.fixture
def device_id(db: SyncDatabase) -> int:
    return seed_subscriber(db, IDENT, phones=PHONES)[1]


@pytest.fixture
def clock() -> task.Clock:
    c = task.Clock()
    c.advance(START)
    return c


@pytest.fixture
def live() -> LiveState:
    return LiveState(SILENCE)


@pytest.fixture
def gateway(clock: task.Clock, db: SyncDatabase, live: LiveState, device_id: int) -> Gateway:
    return Gateway(clock, db, live, heartbeat_interval=HEARTBEAT)


@pytest.fixture
def term(gateway: Gateway, clock: task.Clock) -> Terminal:
    return Terminal(gateway, clock)


def incidents(db: SyncDatabase) -> list[Incident]:
    return list(db.query(lambda s: s.scalars(select(Incident).order_by(Incident.id)).all()))


def timeline(db: SyncDatabase, incident_id: int) -> list[str]:
    return list(
        db.query(
            lambda s: s.scalars(
                select(TimelineEntry.action)
                .where(TimelineEntry.incident_id == incident_id)
                .order_by(TimelineEntry.id)
            ).all()
        )
    )


def device_row(db: SyncDatabase, ident: str = IDENT) -> Device:
    return db.query(lambda s: s.scalar(select(Device).where(Device.ident == ident)))


# --- login ----------------------------------------------------------------------------


def test_login_known_device_gets_ack_then_settings(term: Terminal) -> None:
    """A registered ident's LOGIN is ACKed, then SETTINGS carries the interval and contacts."""
    replies = term.login()
    assert replies == [
        {"type": "login_ack", "seq": 0, "key": ("login", 1), "server_time": int(START)},
        {"type": "settings", "seq": 1, "heartbeat_interval_s": HEARTBEAT, "numbers": list(PHONES)},
    ]
    assert not term.closed


def test_login_binds_link_and_marks_device_online(term: Terminal, gateway: Gateway, db) -> None:
    """After LOGIN the gateway routes the ident here; the next flush stores online + firmware."""
    writes = len(db.calls)
    term.login()
    assert gateway.links[IDENT] is term.proto
    live = gateway.live.get(IDENT)
    assert live is not None and live.online
    assert db.calls[writes:] == [("read", "device_for_login")]  # a login writes nothing itself
    assert device_row(db).online is False
    defer.ensureDeferred(LiveStateFlusher(gateway.clock, db, gateway.live, 2.0).flush())
    row = device_row(db)
    assert row.online is True
    assert row.firmware == "sim-1.0"
    assert row.protocol_version == 1
    assert row.last_seen == datetime.fromtimestamp(START, UTC)


def test_login_unknown_ident_nacked_and_connection_closed(gateway, clock) -> None:
    """An unregistered ident gets NACK unknown_device, is counted, and the TCP link is closed."""
    rejects = Delta(
        "dispatch_frames_rejected_total", {"protocol": "native", "reason": "unknown_device"}
    )
    stranger = Terminal(gateway, clock, ident="999999999999999")
    replies = stranger.login()
    assert types(replies) == ["login_nack"]
    assert replies[0]["reason"] == "unknown_device"
    assert replies[0]["key"] == ("login", 1)
    assert stranger.closed
    assert rejects.value == 1
    assert "999999999999999" not in gateway.links


def test_login_lookup_failure_answers_try_later_and_keeps_connection(term, db) -> None:
    """If the store cannot look the ident up, LOGIN gets NACK try_later and may be resent."""
    db.fail_next = {"read"}
    first = term.login()
    assert types(first) == ["login_nack"] and first[0]["reason"] == "try_later"
    assert not term.closed
    assert types(term.login()) == ["login_ack", "settings"]


def test_login_lookup_failure_does_not_bind(term, db, gateway) -> None:
    """A LOGIN the store could not look up leaves the device unbound: heartbeats are NACKed."""
    db.fail_next = {"read"}
    assert types(term.login()) == ["login_nack"]
    assert IDENT not in gateway.links
    assert types(term.heartbeat()) == ["nack"]
    assert types(term.login()) == ["login_ack", "settings"]


def test_heartbeat_before_login_is_nacked_not_logged_in(term: Terminal) -> None:
    """A frame before LOGIN gets NACK not_logged_in and the connection stays open."""
    rejects = Delta(
        "dispatch_frames_rejected_total", {"protocol": "native", "reason": "not_logged_in"}
    )
    replies = term.heartbeat()
    assert types(replies) == ["nack"]
    assert replies[0]["reason"] == "not_logged_in"
    assert replies[0]["key"] == ("heartbeat", 1)
    assert not term.closed
    assert rejects.value == 1
    assert types(term.login()) == ["login_ack", "settings"]


def test_frame_with_other_ident_after_login_is_not_logged_in(term, gateway, clock) -> None:
    """On a logged-in connection, a frame carrying a different ident gets NACK not_logged_in."""
    term.login()
    other = NativeTerminalCodec("860000000000999")
    replies = term.send(other.heartbeat(50, False, 50))
    assert types(replies) == ["nack"] and replies[0]["reason"] == "not_logged_in"


def test_login_timeout_closes_silent_connection(gateway, clock) -> None:
    """A TCP connection that never logs in is closed after LOGIN_TIMEOUT_S."""
    idle = Terminal(gateway, clock)
    clock.advance(transport_mod.LOGIN_TIMEOUT_S - 1)
    assert not idle.closed
    clock.advance(1)
    assert idle.closed


def test_login_timeout_spares_logged_in_connection(term: Terminal, clock) -> None:
    """A connection that logged in is not closed when the login timeout would have fired."""
    term.login()
    clock.advance(transport_mod.LOGIN_TIMEOUT_S * 2)
    assert not term.closed


def test_second_login_replaces_first_connection(gateway, clock) -> None:
    """A second LOGIN of the same ident closes the older connection; the newer one works."""
    first = Terminal(gateway, clock)
    first.login()
    second = Terminal(gateway, clock)
    assert types(second.login()) == ["login_ack", "settings"]
    assert first.closed
    assert not second.closed
    assert gateway.links[IDENT] is second.proto
    first.lose()  # the old connection's teardown must not unbind the new one
    assert gateway.links[IDENT] is second.proto
    replies = second.heartbeat()
    assert types(replies) == ["ack"] and replies[0]["key"] == ("heartbeat", 2)


def test_connection_lost_unbinds_device(term: Terminal, gateway: Gateway) -> None:
    """When the logged-in connection goes away the gateway no longer routes to it."""
    term.login()
    term.lose()
    assert IDENT not in gateway.links


# --- heartbeats and stream reassembly ---------------------------------------------------


def test_heartbeat_is_acked_and_updates_live_state(term, gateway) -> None:
    """A heartbeat is ACKed from memory and its battery/signal/charging land in live state."""
    term.login()
    replies = term.heartbeat(battery=42, signal=33, charging=True)
    assert replies == [
        {"type": "ack", "seq": 0, "key": ("heartbeat", 2), "server_time": int(START)}
    ]
    d = gateway.live.get(IDENT)
    assert (d.battery, d.signal, d.charging) == (42, 33, True)


def test_unknown_battery_keeps_last_known_value(term: Terminal, gateway: Gateway) -> None:
    """A heartbeat with battery/signal 0xFF (unknown) keeps the last known values."""
    term.login()
    term.heartbeat(battery=42, signal=33)
    assert types(term.heartbeat(battery=0xFF, signal=0xFF)) == ["ack"]
    d = gateway.live.get(IDENT)
    assert (d.battery, d.signal) == (42, 33)


def test_terminal_ack_of_settings_gets_no_reply(term: Terminal) -> None:
    """The terminal's ACK of the SETTINGS command is not answered."""
    settings = term.login()[1]
    assert term.send(term.sim.command_ack(MsgType.SETTINGS, settings["seq"])) == []
    assert not term.closed


def test_short_payload_nacked_malformed(term: Terminal) -> None:
    """A good-CRC heartbeat whose payload is too short gets NACK malformed; the link stays."""
    term.login()
    replies = term.send(raw_frame(MsgType.HEARTBEAT, b"\x50", seq=4))
    assert types(replies) == ["nack"]
    assert replies[0]["reason"] == "malformed" and replies[0]["key"] == ("heartbeat", 4)
    assert not term.closed


def test_settings_carry_at_most_five_numbers(gateway: Gateway, clock, db) -> None:
    """SETTINGS lists the first five contact numbers in calling order, no more."""
    phones = tuple(f"+86138000000{n:02d}" for n in range(7))
    seed_subscriber(db, "860000000000777", phones=phones)
    replies = Terminal(gateway, clock, ident="860000000000777").login()
    assert replies[1]["numbers"] == list(phones[:5])


@pytest.mark.parametrize("chunk", [None, 1, 7, 29])
def test_stream_split_anywhere_gives_same_replies(term: Terminal, chunk: int | None) -> None:
    """LOGIN+HEARTBEAT+SOS in one write or split into any chunk size gets identical replies."""
    sim = term.sim
    login, beat = sim.login(), sim.heartbeat(80, False, 70)
    stream = login + beat + sim.sos(ev.SosTrigger.BUTTON, WENZHOU, START - 5, 77)[0]
    step = chunk or len(stream)
    for i in range(0, len(stream), step):
        term.proto.dataReceived(stream[i : i + step])
    t = int(START)
    assert term.replies() == [
        {"type": "login_ack", "seq": 0, "key": ("login", 1), "server_time": t},
        {"type": "settings", "seq": 1, "heartbeat_interval_s": HEARTBEAT, "numbers": list(PHONES)},
        {"type": "ack", "seq": 0, "key": ("heartbeat", 2), "server_time": t},
        {"type": "ack", "seq": 0, "key": ("sos", 3), "server_time": t},
    ]


def test_unknown_type_frame_nacked_unsupported_and_connection_kept(term: Terminal) -> None:
    """A well-framed frame of an unknown type gets NACK reason 3 and the link stays open."""
    term.login()
    replies = term.send(raw_frame(0x10, b"\x01\x02", seq=9))
    assert types(replies) == ["nack"]
    assert replies[0]["reason"] == ev.Reject(3).name.lower() == "unsupported_type"
    assert replies[0]["key"] == ("16", 9)
    assert not term.closed
    assert types(term.heartbeat()) == ["ack"]


def test_settings_frame_from_terminal_is_unsupported(term: Terminal) -> None:
    """A server-only type (SETTINGS) sent by a terminal gets NACK unsupported_type."""
    term.login()
    frame = fmt.build_frame(MsgType.SETTINGS, IDENT, 5, {"heartbeat_interval_s": 1, "numbers": []})
    replies = term.send(frame)
    assert types(replies) == ["nack"] and replies[0]["reason"] == "unsupported_type"


def test_noise_run_at_start_closes_connection(term: Terminal) -> None:
    """300 garbage bytes before any good frame close the connection and count as noise."""
    noise = Delta("dispatch_decode_errors_total", {"protocol": "native", "reason": "noise"})
    assert term.send(b"\x00" * 300) == []
    assert term.closed
    assert noise.value >= 1
    assert term.send(term.sim.login()) == []  # nothing is answered once closed


def test_short_noise_before_login_is_skipped(term: Terminal) -> None:
    """Less noise than the start limit is skipped and the LOGIN behind it is answered."""
    replies = term.send(b"\x00" * 200 + term.sim.login())
    assert types(replies) == ["login_ack", "settings"]
    assert not term.closed


# --- SOS ----------------------------------------------------------------------------------


def test_sos_acked_only_after_incident_stored(gateway, clock, db) -> None:
    """The SOS ACK is written when the incident (kind, location, 'alarm' entry) is committed."""
    seen_at_write: list[int] = []
    term = Terminal(gateway, clock, on_write=lambda _data: seen_at_write.append(len(incidents(db))))
    term.login()
    seen_at_write.clear()
    frame, (_, seq) = term.sim.sos(ev.SosTrigger.BUTTON, WENZHOU, START - 3, 64)
    replies = term.send(frame)
    assert replies == [{"type": "ack", "seq": 0, "key": ("sos", seq), "server_time": int(START)}]
    assert seen_at_write == [1]  # the incident already existed when the ACK went out
    [incident] = incidents(db)
    assert incident.kind == "sos"
    assert incident.status == "open"
    assert incident.device_ident == IDENT
    assert (incident.lat, incident.lon, incident.accuracy_m) == (27.994, 120.699, 15)
    assert timeline(db, incident.id) == ["alarm"]


def test_resent_sos_acked_again_without_new_incident(term: Terminal, db) -> None:
    """The same SOS bytes resent are ACKed again but stored once (one incident, one frame row)."""
    term.login()
    frame, (_, seq) = term.sim.sos(ev.SosTrigger.BUTTON, WENZHOU, START, 64)
    first = term.send(frame)
    again = term.send(frame)
    assert (
        first
        == again
        == [{"type": "ack", "seq": 0, "key": ("sos", seq), "server_time": int(START)}]
    )
    [incident] = incidents(db)
    assert db.count(SosFrame) == 1
    assert timeline(db, incident.id) == ["alarm"]


def test_new_sos_joins_open_incident_as_repeat(term: Terminal, db, clock) -> None:
    """A new SOS (new seq) while an alarm is open joins it with an 'alarm_repeat' entry."""
    term.login()
    term.send(term.sim.sos(ev.SosTrigger.BUTTON, WENZHOU, START, 64)[0])
    clock.advance(30)
    frame, (_, seq) = term.sim.sos(ev.SosTrigger.BUTTON, None, START + 30, 63)
    assert term.send(frame)[0]["key"] == ("sos", seq)
    [incident] = incidents(db)
    assert timeline(db, incident.id) == ["alarm", "alarm_repeat"]
    assert db.count(SosFrame) == 2


def test_fall_trigger_opens_fall_incident(term: Terminal, db) -> None:
    """An SOS with the fall trigger opens an incident of kind 'fall'."""
    term.login()
    replies = term.send(term.sim.sos(ev.SosTrigger.FALL, None, START, 90)[0])
    assert types(replies) == ["ack"]
    [incident] = incidents(db)
    assert incident.kind == "fall"
    assert incident.lat is None


def test_sos_store_failure_nacks_try_later_then_resend_succeeds(term: Terminal, db) -> None:
    """If storing fails the SOS gets NACK try_later (no ACK); the resend is stored and ACKed."""
    failed = Delta("dispatch_sos_frames_total", {"result": "store_failed"})
    term.login()
    frame, (_, seq) = term.sim.sos(ev.SosTrigger.BUTTON, WENZHOU, START, 64)
    db.fail_next = {"urgent"}
    replies = term.send(frame)
    assert types(replies) == ["nack"]
    assert replies[0]["reason"] == "try_later" and replies[0]["key"] == ("sos", seq)
    assert incidents(db) == []
    assert failed.value == 1
    assert not term.closed
    retry = term.send(frame)
    assert retry == [{"type": "ack", "seq": 0, "key": ("sos", seq), "server_time": int(START)}]
    assert len(incidents(db)) == 1


def test_sos_before_login_is_not_stored(term: Terminal, db) -> None:
    """An SOS before LOGIN gets NACK not_logged_in and creates nothing."""
    replies = term.send(term.sim.sos(ev.SosTrigger.BUTTON, None, START, 50)[0])
    assert types(replies) == ["nack"] and replies[0]["reason"] == "not_logged_in"
    assert incidents(db) == []


def test_incident_listener_told_once_per_new_frame(term: Terminal, gateway: Gateway) -> None:
    """Incident listeners hear each stored SOS frame, but not its retransmissions."""
    heard: list[tuple[int, bool]] = []
    gateway.incident_listeners.append(
        lambda rec, event, _dev: heard.append((event.seq, rec.created))
    )
    term.login()
    frame, (_, seq) = term.sim.sos(ev.SosTrigger.BUTTON, None, START, 50)
    term.send(frame)
    term.send(frame)
    frame2, (_, seq2) = term.sim.sos(ev.SosTrigger.BUTTON, None, START, 50)
    term.send(frame2)
    assert heard == [(seq, True), (seq2, False)]


# --- offline detection ----------------------------------------------------------------


def test_silence_takes_device_offline(term: Terminal, live: LiveState, clock) -> None:
    """No frame for heartbeat_interval*offline_after: the sweep marks it offline and calls back."""
    offline: list[tuple[DeviceLive, str]] = []
    live.on_offline.append(lambda d, reason: offline.append((d, reason)))
    term.login()
    online_before = sample("dispatch_sessions_online")
    clock.advance(SILENCE - 1)
    assert live.sweep(clock.seconds()) == []
    clock.advance(2)
    gone = live.sweep(clock.seconds())
    d = live.get(IDENT)
    assert gone == [d] and offline == [(d, "silent")]
    assert d.online is False
    assert sample("dispatch_sessions_online") == online_before - 1


def test_heartbeats_keep_device_online(term: Terminal, live: LiveState, clock) -> None:
    """A device heartbeating every interval stays online well past the silence limit."""
    offline: list[DeviceLive] = []
    live.on_offline.append(lambda d, _reason: offline.append(d))
    term.login()
    for _ in range(6):
        clock.advance(HEARTBEAT)
        assert types(term.heartbeat()) == ["ack"]
        live.sweep(clock.seconds())
    assert live.get(IDENT).online
    assert offline == []


def test_flusher_tick_sweeps_and_stores_offline(term, live, db, clock) -> None:
    """The flusher's timer takes a silent device offline and writes that to the store."""
    offline: list[str] = []
    live.on_offline.append(lambda d, _reason: offline.append(d.ident))
    flusher = LiveStateFlusher(clock, db, live, 2.0)
    flusher.start()
    term.login()
    clock.pump([2.0] * 10)
    assert device_row(db).online is True
    clock.pump([2.0] * (SILENCE // 2 + 1))
    assert offline == [IDENT]
    assert device_row(db).online is False
    flusher.stop()


# --- live-state flushing ---------------------------------------------------------------


def test_heartbeat_costs_no_database_write(term: Terminal, db) -> None:
    """Heartbeats touch only memory; the store is not called until a flush."""
    term.login()
    calls = len(db.calls)
    for _ in range(5):
        term.heartbeat()
    assert len(db.calls) == calls


def test_flush_writes_many_devices_in_chunks(
    gateway: Gateway, clock, db, live, monkeypatch
) -> None:
    """One flush writes every dirty device, CHUNK rows per write, with battery/signal/last_seen."""
    idents = [f"86000000000010{n}" for n in range(7)]
    seed_many(db, idents)
    monkeypatch.setattr(livestate, "CHUNK", 3)
    terms = {ident: Terminal(gateway, clock, ident=ident) for ident in idents}
    for term in terms.values():
        assert types(term.login()) == ["login_ack", "settings"]
    clock.advance(10)
    writes_before = len(db.calls)
    for n, term in enumerate(terms.values()):
        term.heartbeat(battery=50 + n, signal=20 + n, charging=n % 2 == 0)
    assert len(db.calls) == writes_before
    rows = Delta("dispatch_live_flush_rows_total")
    flusher = LiveStateFlusher(clock, db, live, 2.0)
    defer.ensureDeferred(flusher.flush())
    assert db.count_calls("write", "flush_live") == 3  # 7 rows in chunks of 3
    assert db.relaxed == ["flush_live"] * 3 + ["append_events"]  # live state: no fsync
    assert rows.value == 7
    seen = datetime.fromtimestamp(START + 10, UTC)
    for n, ident in enumerate(idents):
        row = device_row(db, ident)
        assert (row.online, row.battery, row.signal) == (True, 50 + n, 20 + n)
        assert row.charging is (n % 2 == 0)
        assert row.last_seen == seen
    assert db.count(EventLog, EventLog.kind == "login") == 7


def flushed_rows(db: SyncDatabase, live: LiveState, clock) -> Delta:
    """Run one flush now; return how many device rows it wrote."""
    rows = Delta("dispatch_live_flush_rows_total")
    defer.ensureDeferred(LiveStateFlusher(clock, db, live, 2.0).flush())
    return rows


def test_steady_heartbeats_write_last_seen_only_every_persist_interval(
    term: Terminal, db, live: LiveState, clock
) -> None:
    """Unchanged heartbeats dirty no row until the stored last_seen is persist_every_s old."""
    term.login()
    term.heartbeat(battery=80, signal=70)
    assert flushed_rows(db, live, clock).value == 1
    beats = int(live.persist_every_s // HEARTBEAT)
    written = []
    for _ in range(beats * 2):
        clock.advance(HEARTBEAT)
        assert types(term.heartbeat(battery=80, signal=70)) == ["ack"]
        written.append(int(flushed_rows(db, live, clock).value))
    # One row per persist interval: the first beat at which last_seen is that old.
    assert written == ([0] * (beats - 1) + [1]) * 2
    assert device_row(db).last_seen == datetime.fromtimestamp(clock.seconds(), UTC)


def test_battery_or_charging_change_is_written_at_next_flush(
    term: Terminal, db, live: LiveState, clock
) -> None:
    """A heartbeat that changes battery or charging is stored at once; signal alone is not."""
    term.login()
    term.heartbeat(battery=80, signal=70)
    flushed_rows(db, live, clock)
    clock.advance(HEARTBEAT)
    term.heartbeat(battery=80, signal=55)
    assert flushed_rows(db, live, clock).value == 0
    term.heartbeat(battery=79, signal=55)
    assert flushed_rows(db, live, clock).value == 1
    term.heartbeat(battery=79, signal=55, charging=True)
    assert flushed_rows(db, live, clock).value == 1
    row = device_row(db)
    assert (row.battery, row.signal, row.charging) == (79, 55, True)


def test_going_offline_stores_the_true_last_seen(term: Terminal, db, live, clock) -> None:
    """A device that falls silent is stored offline with the time of its last frame."""
    term.login()
    flushed_rows(db, live, clock)
    clock.advance(HEARTBEAT)
    term.heartbeat()
    last_frame = clock.seconds()
    clock.advance(SILENCE + 1)
    live.sweep(clock.seconds())
    assert flushed_rows(db, live, clock).value == 1
    row = device_row(db)
    assert row.online is False
    assert row.last_seen == datetime.fromtimestamp(last_frame, UTC)


def test_restored_device_gets_the_persist_slack_before_going_offline(clock) -> None:
    """After a restart the stored last_seen may be persist_every_s stale: count from later."""
    live = LiveState(SILENCE, persist_every_s=300)
    now = clock.seconds()
    live.restore(7, IDENT, now - SILENCE - 60, now)
    assert live.sweep(now) == []  # would have gone offline at once without the slack
    assert live.sweep(now + 300 - 60 + 1) == [live.get(IDENT)]
    fresh = LiveState(SILENCE, persist_every_s=300)
    fresh.restore(8, "860000000000009", now - 10, now)
    assert fresh.get("860000000000009").last_seen == now  # never later than now


def test_flush_failure_requeues_rows_for_next_flush(term: Terminal, db, live, clock) -> None:
    """A flush that fails loses nothing: the rows and events are written by the next flush."""
    errors = Delta("dispatch_db_errors_total", {"op": "live_flush"})
    term.login()
    term.heartbeat(battery=33, signal=44)
    flusher = LiveStateFlusher(clock, db, live, 2.0)
    db.fail_next = {"write"}
    defer.ensureDeferred(flusher.flush())
    assert errors.value == 1
    assert device_row(db).battery is None
    assert db.count(EventLog, EventLog.kind == "login") == 0
    defer.ensureDeferred(flusher.flush())
    row = device_row(db)
    assert (row.battery, row.signal) == (33, 44)
    assert db.count(EventLog, EventLog.kind == "login") == 1


# --- the wired application -------------------------------------------------------------


@pytest.fixture
def app_gateway(sqlite_url: str, db: SyncDatabase, device_id: int) -> Iterator[DispatchApp]:
    reactor = MemoryReactorClock()
    reactor.advance(START)
    app = DispatchApp(Config(db=sqlite_url), reactor)
    app.gateway.db = db
    app.flusher.db = db
    yield app
    app.db.stop()


def test_app_closes_link_of_device_gone_silent(app_gateway: DispatchApp) -> None:
    """In the wired app, a device swept offline for silence has its connection closed."""
    app = app_gateway
    term = Terminal(app.gateway, app.reactor)
    term.login()
    app.reactor.advance(SILENCE + 1)
    app.live.sweep(app.reactor.seconds())
    assert term.closed


def test_app_device_view_shows_live_fields_before_any_flush(app_gateway: DispatchApp, db) -> None:
    """GET /devices/{ident} answers from live state: the store's row lags by design."""
    app = app_gateway
    app.api.db = db
    term = Terminal(app.gateway, app.reactor)
    term.login()
    app.reactor.advance(HEARTBEAT)
    term.heartbeat(battery=64, signal=12)
    assert device_row(db).online is False  # nothing flushed yet
    request = ApiRequest("GET", f"/api/v1/devices/{IDENT}", {"ident": IDENT}, {}, b"")
    result: list[Any] = []
    defer.ensureDeferred(app.api.get_device(request)).addCallback(result.append)
    code, device = result[0]
    assert code == 200
    assert device["online"] is True
    assert device["last_seen"] == datetime.fromtimestamp(START + HEARTBEAT, UTC).isoformat()
    assert (device["battery"], device["signal"], device["firmware"]) == (64, 12, "sim-1.0")


def test_app_logout_is_acked_and_connection_left_open(app_gateway: DispatchApp) -> None:
    """LOGOUT is ACKed and the server leaves the TCP connection for the terminal to close."""
    app = app_gateway
    term = Terminal(app.gateway, app.reactor)
    term.login()
    replies = term.send(fmt.build_frame(MsgType.LOGOUT, IDENT, 2, {}))
    assert types(replies) == ["ack"] and replies[0]["key"] == ("logout", 2)
    assert not term.closed


def test_gateway_logout_acked_and_device_offline(term: Terminal, live: LiveState) -> None:
    """LOGOUT alone (no app callbacks) is ACKed and shows the device offline at once."""
    term.login()
    replies = term.send(fmt.build_frame(MsgType.LOGOUT, IDENT, 2, {}))
    assert types(replies) == ["ack"]
    assert live.get(IDENT).online is False
    assert not term.closed


# --- UDP ----------------------------------------------------------------------------------


class FakeUdpTransport:
    """Records every datagram the protocol sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))

    def take(self) -> list[tuple[dict[str, Any], tuple[str, int]]]:
        out = [(NativeTerminalCodec.decode(data), addr) for data, addr in self.sent]
        self.sent.clear()
        return out


@pytest.fixture
def udp(gateway: Gateway, clock) -> tuple[NativeDatagramProtocol, FakeUdpTransport]:
    proto = NativeDatagramProtocol(gateway, clock, rate=20.0)
    fake = FakeUdpTransport()
    proto.makeConnection(fake)
    return proto, fake


ADDR = ("10.9.8.7", 5000)


def test_udp_login_acked_to_sender(udp, gateway: Gateway) -> None:
    """A UDP LOGIN is ACKed, and SETTINGS follows, to the datagram's source address."""
    proto, fake = udp
    sim = NativeTerminalCodec(IDENT)
    proto.datagramReceived(sim.login(), ADDR)
    sent = fake.take()
    assert [(r["type"], addr) for r, addr in sent] == [("login_ack", ADDR), ("settings", ADDR)]
    assert sent[1][0]["numbers"] == list(PHONES)
    link = gateway.links[IDENT]
    assert isinstance(link, UdpLink) and link.addr == ADDR


def test_udp_sos_acked_after_store(udp, db) -> None:
    """A UDP SOS from a logged-in terminal is stored and ACKed to its address."""
    proto, fake = udp
    sim = NativeTerminalCodec(IDENT)
    proto.datagramReceived(sim.login(), ADDR)
    fake.take()
    frame, (_, seq) = sim.sos(ev.SosTrigger.BUTTON, WENZHOU, START, 70)
    proto.datagramReceived(frame, ADDR)
    assert [(r["type"], r["key"], a) for r, a in fake.take()] == [("ack", ("sos", seq), ADDR)]
    [incident] = incidents(db)
    assert incident.kind == "sos"


def test_udp_new_source_port_becomes_reply_address(udp, gateway: Gateway) -> None:
    """After NAT rebinding, replies and commands go to the newest source address of the ident."""
    proto, fake = udp
    sim = NativeTerminalCodec(IDENT)
    proto.datagramReceived(sim.login(), ADDR)
    fake.take()
    moved = (ADDR[0], 6123)
    proto.datagramReceived(sim.heartbeat(60, False, 50), moved)
    assert [(r["type"], a) for r, a in fake.take()] == [("ack", moved)]
    assert gateway.links[IDENT].send_command(ev.CarePrompt(round_id=7))
    [(prompt, addr)] = fake.take()
    assert prompt["type"] == "care_prompt" and prompt["round_id"] == 7 and addr == moved


def test_udp_heartbeat_before_login_nacked(udp) -> None:
    """A UDP frame from an ident with no UDP session gets NACK not_logged_in."""
    proto, fake = udp
    proto.datagramReceived(NativeTerminalCodec(IDENT).heartbeat(60, False, 50), ADDR)
    [(reply, addr)] = fake.take()
    assert reply["type"] == "nack" and reply["reason"] == "not_logged_in" and addr == ADDR


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "noise"),
        (NativeTerminalCodec(IDENT).login()[:-1] + b"\x00", "bad_crc"),
        (NativeTerminalCodec(IDENT).login() + b"\x00", "bad_length"),
    ],
)
def test_udp_garbage_gets_no_reply_and_is_counted(udp, data: bytes, reason: str) -> None:
    """A datagram that is not exactly one good frame is dropped silently and counted."""
    proto, fake = udp
    counter = Delta("dispatch_decode_errors_total", {"protocol": "native_udp", "reason": reason})
    proto.datagramReceived(data, ADDR)
    assert fake.sent == []
    assert counter.value == 1


def test_udp_rate_limit_drops_burst_excess(udp, clock) -> None:
    """More than the burst (2 x rate) datagrams from one IP in one instant are dropped."""
    proto, fake = udp
    limited = Delta(
        "dispatch_decode_errors_total", {"protocol": "native_udp", "reason": "rate_limited"}
    )
    frame = NativeTerminalCodec(IDENT).heartbeat(60, False, 50)
    for _ in range(50):
        proto.datagramReceived(frame, ADDR)
    assert len(fake.take()) == 40
    assert limited.value == 10
    proto.datagramReceived(frame, ("10.9.8.8", 5000))  # another address has its own budget
    assert len(fake.take()) == 1
    clock.advance(1.0)  # 20 tokens per second refill
    for _ in range(25):
        proto.datagramReceived(frame, ADDR)
    assert len(fake.take()) == 20
    assert limited.value == 15


def test_udp_login_replaces_tcp_session(udp, gateway: Gateway, clock) -> None:
    """A UDP LOGIN of an ident logged in over TCP closes the TCP connection."""
    proto, fake = udp
    tcp = Terminal(gateway, clock)
    tcp.login()
    proto.datagramReceived(NativeTerminalCodec(IDENT).login(), ADDR)
    assert tcp.closed
    assert isinstance(gateway.links[IDENT], UdpLink)
