"""A fleet of native terminals in one process, for load and latency measurements.

    python -m simulators.fleet --server 127.0.0.1:7700 --count 1000 --heartbeat 60 \\
        --duration 30 --source-count 4 --sos-burst 100 --sos-at 5 --json fleet.json

One Twisted reactor holds ``--count`` native TCP connections, spread over
several loopback source addresses (127.0.0.2, 127.0.0.3, ...; each has its own
ephemeral ports) and opened at most ``--concurrency`` at a time.  Each terminal
logs in, ACKs the SETTINGS push, and then either

* heartbeats every ``--heartbeat`` seconds at its own random phase (a timing
  wheel sends the ones due every few milliseconds), or
* in stream mode (``--stream``, or ``--pipelined K``) keeps exactly 1 (or K)
  heartbeats in flight, sending the next as soon as an ACK arrives: the
  throughput measurement.

SOS presses are injected at ``--sos-rate`` per second and/or as one burst of
``--sos-burst`` presses ``--sos-at`` seconds after every terminal is logged in;
each press comes from a terminal that has not pressed yet in this run, and each
SOS is resent with the same bytes every 5 s until its ACK arrives.  CARE_PROMPTs
are ACKed and answered "ok".  Heartbeat frames are assembled from pre-built
bytes (seq and CRC patched in); everything else is built with
``dispatch.protocol.native_format.build_frame``.

The run is bounded: at most ``MAX_COUNT`` terminals, ``MAX_DURATION_S`` seconds
of steady state, a ramp timeout and an SOS drain timeout, then it closes every
connection and stops by itself.  Only loopback addresses (127.0.0.0/8) are
accepted as server and sources.  stdout gets one JSON line per phase
(``ready``, ``window_start``, ``window_end``, ``done``); ``--json`` writes the
full report: frames sent and received, ACKs, SOS sent/acked/duplicate ACKs,
SOS latency (first send -> ACK) p50/p90/p99/max, connects and failures.
Exit status 1 means an SOS was never acknowledged or a terminal never logged in.
"""

from __future__ import annotations

import argparse
import binascii
import ipaddress
import json
import math
import random
import resource
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from twisted.internet import defer, task
from twisted.internet.protocol import ClientFactory, Protocol

from dispatch.protocol import native_format as fmt
from dispatch.protocol.native_format import MsgType

MAX_COUNT = 19_900
MAX_DURATION_S = 3600.0
MAX_RAMP_S = 900.0
MAX_DRAIN_S = 300.0
MAX_PIPELINED = 64
MAX_SOS_RATE = 2000.0
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
MAGIC = fmt.MAGIC
OVERHEAD = fmt.OVERHEAD
HEADER = fmt.HEADER_SIZE
FAST_SEND = True

IDLE, CONNECTING, LOGIN, READY, DONE = range(5)


def make_ident(prefix: str, index: int, width: int = 15) -> str:
    """The ident of terminal ``index``: ``prefix`` then zero-padded digits (IMEI-like)."""
    digits = max(width - len(prefix), len(str(index)))
    ident = f"{prefix}{index:0{digits}d}"
    if len(ident) > fmt.IDENT_SIZE:
        raise ValueError(f"ident {ident!r} longer than {fmt.IDENT_SIZE} characters")
    return ident


def percentiles(values: list[float], points: tuple[int, ...] = (50, 90, 99)) -> dict[str, Any]:
    """Nearest-rank percentiles, max, mean and count (None when empty)."""
    if not values:
        return {"n": 0, **{f"p{p}": None for p in points}, "max": None, "mean": None}
    s = sorted(values)
    out: dict[str, Any] = {"n": len(s)}
    for p in points:
        out[f"p{p}"] = round(s[max(0, math.ceil(p / 100 * len(s)) - 1)], 3)
    out["max"] = round(s[-1], 3)
    out["mean"] = round(sum(s) / len(s), 3)
    return out


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host) in LOOPBACK
    except ValueError:
        return False


@dataclass
class FleetOptions:
    """Everything a run needs; the command line maps onto it one to one."""

    host: str = "127.0.0.1"
    port: int = 7700
    count: int = 100
    heartbeat: float = 60.0
    duration: float = 30.0
    sources: tuple[str, ...] = ()
    source_count: int = 0  # 0: one source per 5,000 terminals
    sos_rate: float = 0.0
    sos_rate_at: float = 0.0
    sos_rate_count: int = 0  # 0: until the end of the run
    sos_burst: int = 0
    sos_at: float = 0.0
    sos_resend: float = 5.0
    stream: bool = False
    pipelined: int = 1
    warmup: float = 2.0
    idents: list[str] | None = None
    ident_prefix: str = "86"
    first_index: int = 0
    concurrency: int = 200
    connect_retries: int = 3
    connect_timeout: float = 10.0
    ramp_timeout: float = 120.0
    drain: float = 15.0
    care_delay: float = 0.5
    battery: int = 80
    signal: int = 70
    seed: int = 1
    keep_presses: bool = True

    def check(self) -> FleetOptions:
        """Enforce the bounds; raises ValueError naming the problem."""
        if not is_loopback(self.host):
            raise ValueError(f"server {self.host} is not a loopback address (127.0.0.0/8)")
        if not self.sources:
            k = self.source_count or max(1, math.ceil(self.count / 5000))
            if not 1 <= k <= 250:
                raise ValueError("--source-count must be 1-250")
            self.sources = tuple(f"127.0.0.{2 + i}" for i in range(k))
        for src in self.sources:
            if not is_loopback(src):
                raise ValueError(f"source {src} is not a loopback address (127.0.0.0/8)")
        if self.idents is not None:
            self.count = len(self.idents) if not self.count else min(self.count, len(self.idents))
        if not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"--count must be 1-{MAX_COUNT}")
        if not 0 < self.duration <= MAX_DURATION_S:
            raise ValueError(f"--duration must be in (0, {MAX_DURATION_S:g}] seconds")
        if not 0 < self.ramp_timeout <= MAX_RAMP_S or not 0 <= self.drain <= MAX_DRAIN_S:
            raise ValueError("ramp timeout or drain out of bounds")
        if self.heartbeat <= 0:
            raise ValueError("--heartbeat must be positive")
        if not 1 <= self.pipelined <= MAX_PIPELINED:
            raise ValueError(f"--pipelined must be 1-{MAX_PIPELINED}")
        if not 0 <= self.sos_rate <= MAX_SOS_RATE:
            raise ValueError(f"--sos-rate must be 0-{MAX_SOS_RATE:g}")
        if self.sos_burst < 0 or self.sos_burst > self.count:
            raise ValueError("--sos-burst must be 0..count (one press per terminal)")
        if not 1 <= self.concurrency <= 5000:
            raise ValueError("--concurrency must be 1-5000")
        if self.sos_resend <= 0:
            raise ValueError("--sos-resend must be positive")
        return self


class Term:
    """One simulated terminal."""

    __slots__ = (
        "idx",
        "ident",
        "src",
        "seq",
        "conn",
        "state",
        "hb_body",
        "pressed",
        "slot",
        "retries",
        "ramping",
        "logins",
    )

    def __init__(self, idx: int, ident: str, src: str, hb_body: bytes) -> None:
        self.idx = idx
        self.ident = ident
        self.src = src
        self.seq = 0
        self.conn: FleetConn | None = None
        self.state = IDLE
        self.hb_body = hb_body  # version .. ident, no magic: the fixed part under the CRC
        self.pressed = False
        self.slot = -1
        self.retries = 0
        self.ramping = True
        self.logins = 0

    def next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        return self.seq


class Press:
    """One SOS press and what became of it."""

    __slots__ = ("term", "seq", "frame", "phase", "t_press", "wall", "t_last", "sends", "ack_s")

    def __init__(self, term: Term, seq: int, frame: bytes, phase: str, now: float) -> None:
        self.term = term
        self.seq = seq
        self.frame = frame
        self.phase = phase
        self.t_press = now
        self.wall = time.time()
        self.t_last = now
        self.sends = 0
        self.ack_s: float | None = None


@dataclass
class Stats:
    """Counters the report is made of (live, so in-process users can sample them)."""

    connect_attempts: int = 0
    connected: int = 0
    connect_failed: int = 0
    login_acked: int = 0
    login_nacked: int = 0
    lost: int = 0
    reconnects: int = 0
    hb_sent: int = 0
    hb_acked: int = 0
    bad_crc: int = 0
    noise_bytes: int = 0
    care_prompts: int = 0
    care_answers: int = 0
    settings: int = 0
    sos_pressed: int = 0
    sos_frames: int = 0
    sos_resends: int = 0
    sos_acked: int = 0
    sos_duplicate_acks: int = 0
    sos_unexpected_acks: int = 0
    sos_skipped: int = 0
    sent: Counter = field(default_factory=Counter)
    acks: Counter = field(default_factory=Counter)
    nacks: Counter = field(default_factory=Counter)
    received: Counter = field(default_factory=Counter)


_TYPE_NAMES = {int(t): t.name.lower() for t in MsgType}


class FleetConn(Protocol):
    """One terminal's TCP connection: a minimal, checked frame splitter."""

    def __init__(self, fleet: Fleet, term: Term) -> None:
        self.fleet = fleet
        self.term = term
        self.buf = b""

    def connectionMade(self) -> None:
        self.fleet._connected(self.term, self)

    def connectionLost(self, reason: Any = None) -> None:
        self.fleet._lost(self.term, self)

    def dataReceived(self, data: bytes) -> None:
        fleet = self.fleet
        stats = fleet.stats
        buf = self.buf + data if self.buf else data
        n = len(buf)
        i = 0
        out: list[bytes] = []
        crc_hqx = binascii.crc_hqx
        while n - i >= HEADER:
            if buf[i] != 0xD5 or buf[i + 1] != 0x7E:
                j = buf.find(MAGIC, i + 1)
                j = (n - 1 if buf[-1] == 0xD5 else n) if j < 0 else j
                stats.noise_bytes += j - i
                i = j
                continue
            total = OVERHEAD + ((buf[i + 3] << 8) | buf[i + 4])
            if n - i < total:
                break
            end = i + total
            if crc_hqx(buf[i + 2 : end - 2], 0xFFFF) != (buf[end - 2] << 8) | buf[end - 1]:
                stats.bad_crc += 1
                i += 2
                continue
            kind = buf[i + 5]
            if kind == 0x80 and buf[i + 26] == 0x02:
                # ACK of a heartbeat: the hot path of stream mode.
                stats.hb_acked += 1
                if fleet.stream and self.term.state == READY:
                    out.append(fleet.hb_frame(self.term))
            else:
                fleet._frame(self.term, self, kind, buf[i:end])
            i = end
        self.buf = buf[i:] if i < n else b""
        if out:
            stats.hb_sent += len(out)
            send_now(self.transport, out[0] if len(out) == 1 else b"".join(out))


class _TermFactory(ClientFactory):
    noisy = False

    def __init__(self, fleet: Fleet, term: Term) -> None:
        self.fleet = fleet
        self.term = term

    def buildProtocol(self, addr: Any) -> FleetConn:
        return FleetConn(self.fleet, self.term)

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.fleet._connect_failed(self.term, reason.getErrorMessage())


class Fleet:
    """The whole fleet on one reactor; :meth:`run` fires with the report."""

    def __init__(self, reactor: Any, opts: FleetOptions) -> None:
        self.reactor = reactor
        self.opts = opts.check()
        self.stream = opts.stream
        self.stats = Stats()
        self.rng = random.Random(opts.seed)
        self.on_event: list[Any] = []
        idents = opts.idents or [
            make_ident(opts.ident_prefix, opts.first_index + i) for i in range(opts.count)
        ]
        hb_payload = bytes([opts.battery, 0, opts.signal])
        self.terms = [
            Term(
                i,
                ident,
                opts.sources[i % len(opts.sources)],
                b"\x01\x00\x03\x02" + ident.encode("ascii").ljust(fmt.IDENT_SIZE, b"\x00"),
            )
            for i, ident in enumerate(idents[: opts.count])
        ]
        self._hb_tail = hb_payload
        self._check_fast_frame()
        self._queue = list(reversed(self.terms))
        self._ramping = 0
        self._ready_at: float | None = None
        self._end_at: float | None = None
        self._started = 0.0
        self._finished = False
        self.stopping = False
        self._done: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self._timers: list[Any] = []
        self._loops: list[task.LoopingCall] = []
        self.presses: list[Press] = []
        self._pending: dict[tuple[int, int], Press] = {}
        self._acked_keys: set[tuple[int, int]] = set()
        self._sos_cursor = 0
        self._window: dict[str, Any] = {}
        # heartbeat wheel
        self._tick = min(0.05, opts.heartbeat / 4)
        self._nslots = max(1, round(opts.heartbeat / self._tick))
        self._tick = opts.heartbeat / self._nslots
        self._slots: list[list[Term]] = [[] for _ in range(self._nslots)]
        self._wheel_pos = 0
        self._wheel_t0 = 0.0
        self._rate_started: float | None = None
        self._rate_done = 0
        self._drain_until = 0.0

    # --- frames -----------------------------------------------------------------------

    def hb_frame(self, term: Term) -> bytes:
        """The next heartbeat of ``term``: pre-built bytes, new seq, CRC patched."""
        term.seq = seq = (term.seq + 1) & 0xFFFFFFFF
        body = term.hb_body + seq.to_bytes(4, "big") + self._hb_tail
        return MAGIC + body + binascii.crc_hqx(body, 0xFFFF).to_bytes(2, "big")

    def _check_fast_frame(self) -> None:
        probe = Term(0, self.terms[0].ident, "", self.terms[0].hb_body)
        probe.seq = 41
        want = fmt.build_frame(
            MsgType.HEARTBEAT,
            probe.ident,
            42,
            {
                "battery": self.opts.battery,
                "status": 0,
                "signal": self.opts.signal,
                "location": None,
            },
        )
        if self.hb_frame(probe) != want:
            raise AssertionError("pre-built heartbeat differs from build_frame")

    def _build(self, term: Term, msg_type: MsgType, payload: dict[str, Any]) -> bytes:
        return fmt.build_frame(msg_type, term.ident, term.next_seq(), payload)

    def _send(self, term: Term, conn: FleetConn, data: bytes, kind: str) -> None:
        self.stats.sent[kind] += 1
        send_now(conn.transport, data)

    # --- lifecycle --------------------------------------------------------------------

    def run(self) -> defer.Deferred[dict[str, Any]]:
        """Open the connections, run the phases, close; fires with the report."""
        self._started = self.reactor.seconds()
        o = self.opts
        limit = o.ramp_timeout + o.duration + o.drain + 30
        self._later(limit, self._finish, "hard_deadline")
        self._later(o.ramp_timeout, self._ramp_over)
        for _ in range(min(o.concurrency, len(self._queue))):
            self._start_next()
        return self._done

    def _later(self, delay: float, fn: Any, *args: Any) -> Any:
        call = self.reactor.callLater(delay, fn, *args)
        self._timers.append(call)
        return call

    def _loop(self, interval: float, fn: Any) -> task.LoopingCall:
        loop = task.LoopingCall(fn)
        loop.clock = self.reactor
        loop.start(interval, now=False)
        self._loops.append(loop)
        return loop

    def _emit(self, event: str, **data: Any) -> None:
        line = {"event": event, "t": round(self.reactor.seconds() - self._started, 3), **data}
        for listener in self.on_event:
            listener(line)

    def _start_next(self) -> None:
        if self._queue and self._ready_at is None and not self.stopping:
            term = self._queue.pop()
            self._ramping += 1
            self._connect(term)

    def _connect(self, term: Term) -> None:
        if self.stopping:
            return
        term.state = CONNECTING
        self.stats.connect_attempts += 1
        self.reactor.connectTCP(
            self.opts.host,
            self.opts.port,
            _TermFactory(self, term),
            timeout=self.opts.connect_timeout,
            bindAddress=(term.src, 0),
        )

    def _ramp_step_done(self, term: Term) -> None:
        if term.ramping:
            term.ramping = False
            self._ramping -= 1
            self._start_next()
            if not self._queue and self._ramping == 0:
                self._go_ready()

    def _ramp_over(self) -> None:
        if self._ready_at is None:
            self._queue.clear()
            self._go_ready()

    def _connect_failed(self, term: Term, error: str) -> None:
        self._retry_or_give_up(term, error)

    def _retry_or_give_up(self, term: Term, error: str) -> None:
        term.state = IDLE
        if self.stopping:
            return
        if term.ramping:
            term.retries += 1
            if term.retries <= self.opts.connect_retries and self._ready_at is None:
                self._later(0.5 * term.retries, self._connect, term)
                return
            self.stats.connect_failed += 1
            term.state = DONE
            self._emit_error(term, error)
            self._ramp_step_done(term)
        else:
            self.stats.reconnects += 1
            self._later(self.rng.uniform(1.0, 2.0), self._connect, term)

    def _emit_error(self, term: Term, error: str) -> None:
        if self.stats.connect_failed <= 5:
            self._emit("connect_failed", index=term.idx, error=error)

    def _connected(self, term: Term, conn: FleetConn) -> None:
        if self.stopping:
            conn.transport.abortConnection()
            return
        self.stats.connected += 1
        term.conn = conn
        term.state = LOGIN
        frame = self._build(term, MsgType.LOGIN, {"protocol_version": 1, "firmware": "fleet-1"})
        self._send(term, conn, frame, "login")

    def _lost(self, term: Term, conn: FleetConn) -> None:
        if term.conn is not conn:
            return
        was = term.state
        term.conn = None
        if self.stopping or was == DONE:
            term.state = DONE if was == DONE else IDLE
            return
        if was == READY:
            self.stats.lost += 1
        self._retry_or_give_up(term, "connection lost")

    def _go_ready(self) -> None:
        if self._ready_at is not None:
            return
        now = self.reactor.seconds()
        self._ready_at = now
        o = self.opts
        self._end_at = now + o.duration
        self._emit(
            "ready",
            logged_in=sum(1 for t in self.terms if t.state == READY),
            ramp_s=round(now - self._started, 3),
        )
        self._later(min(o.warmup, o.duration), self._window_start)
        self._later(o.duration, self._steady_over)
        if o.sos_rate > 0:
            self._later(o.sos_rate_at, self._rate_start)
        if o.sos_burst > 0:
            self._later(o.sos_at, self._burst)
        self._loop(1.0, self._resend_sos)

    def _window_start(self) -> None:
        self._window = {
            "t0": self.reactor.seconds(),
            "hb0": self.stats.hb_acked,
            "cpu0": _cpu_seconds(),
        }
        self._emit("window_start")

    def _steady_over(self) -> None:
        now = self.reactor.seconds()
        w = self._window
        if w and "t1" not in w:
            w.update(t1=now, hb1=self.stats.hb_acked, cpu1=_cpu_seconds())
            self._emit("window_end")
        for loop in self._loops:
            if loop.running and loop.f == self._rate_tick:
                loop.stop()
        self._drain_until = now + self.opts.drain
        self._loop(0.1, self._drain_check)
        self._drain_check()

    def _drain_check(self) -> None:
        if not self._pending or self.reactor.seconds() >= self._drain_until:
            self._finish("done")

    def stop(self) -> None:
        """End the run now (in-process users); the report fires as usual."""
        self._finish("stopped")

    def _finish(self, why: str) -> None:
        if self._finished:
            return
        self._finished = True
        self.stopping = True
        for call in self._timers:
            if call.active():
                call.cancel()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        if self._ready_at is None:
            self._ready_at = self.reactor.seconds()
        report = self.report(why)
        for term in self.terms:
            if term.conn is not None:
                term.conn.transport.loseConnection()
        self._emit("done", **report["summary"])
        self._done.callback(report)

    # --- inbound ----------------------------------------------------------------------

    def _frame(self, term: Term, conn: FleetConn, kind: int, frame: bytes) -> None:
        stats = self.stats
        name = _TYPE_NAMES.get(kind, f"0x{kind:02x}")
        stats.received[name] += 1
        if kind == MsgType.ACK:
            ref_type = frame[26]
            ref_seq = int.from_bytes(frame[27:31], "big")
            stats.acks[_TYPE_NAMES.get(ref_type, str(ref_type))] += 1
            if ref_type == MsgType.LOGIN:
                self._logged_in(term, conn)
            elif ref_type == MsgType.SOS:
                self._sos_acked(term, ref_seq)
        elif kind == MsgType.NACK:
            ref_type, reason = frame[26], frame[31]
            stats.nacks[f"{_TYPE_NAMES.get(ref_type, ref_type)}:{reason}"] += 1
            if ref_type == MsgType.LOGIN:
                stats.login_nacked += 1
                term.state = DONE
                conn.transport.loseConnection()
                self._ramp_step_done(term)
            elif reason == 1 and term.state == READY:
                # Not logged in (any more): log in again; pending SOS follow the new login.
                term.state = LOGIN
                frame = self._build(
                    term, MsgType.LOGIN, {"protocol_version": 1, "firmware": "fleet-1"}
                )
                self._send(term, conn, frame, "login")
        elif kind == MsgType.SETTINGS:
            stats.settings += 1
            self._command_ack(term, conn, kind, frame)
        elif kind == MsgType.CARE_PROMPT:
            stats.care_prompts += 1
            self._command_ack(term, conn, kind, frame)
            body = fmt.parse_payload(kind, frame[HEADER:-2])
            self._later(self.opts.care_delay, self._care_answer, term, conn, body.round_id)

    def _command_ack(self, term: Term, conn: FleetConn, kind: int, frame: bytes) -> None:
        seq = int.from_bytes(frame[22:26], "big")
        ack = self._build(term, MsgType.ACK, {"ref_type": kind, "ref_seq": seq, "server_time": 0})
        self._send(term, conn, ack, "ack")

    def _care_answer(self, term: Term, conn: FleetConn, round_id: int) -> None:
        if term.conn is conn and term.state == READY:
            self.stats.care_answers += 1
            frame = self._build(term, MsgType.CARE_ANSWER, {"round_id": round_id, "answer": 1})
            self._send(term, conn, frame, "care_answer")

    def _logged_in(self, term: Term, conn: FleetConn) -> None:
        if term.state != LOGIN:
            return
        term.state = READY
        term.logins += 1
        self.stats.login_acked += 1
        if self.stream:
            frames = [self.hb_frame(term) for _ in range(self.opts.pipelined)]
            self.stats.hb_sent += len(frames)
            send_now(conn.transport, b"".join(frames))
        elif term.slot < 0:
            term.slot = self.rng.randrange(self._nslots)
            self._slots[term.slot].append(term)
            if self._wheel_t0 == 0.0:
                self._wheel_t0 = self.reactor.seconds()
                self._loop(self._tick, self._wheel)
        for press in self._pending.values():
            if press.term is term:
                self._send_press(press)
        self._ramp_step_done(term)

    # --- heartbeats -------------------------------------------------------------------

    def _wheel(self) -> None:
        target = int((self.reactor.seconds() - self._wheel_t0) / self._tick)
        pos = max(self._wheel_pos, target - self._nslots + 1)
        stats = self.stats
        while pos <= target:
            for term in self._slots[pos % self._nslots]:
                if term.state == READY and term.conn is not None:
                    send_now(term.conn.transport, self.hb_frame(term))
                    stats.hb_sent += 1
            pos += 1
        self._wheel_pos = pos

    # --- SOS --------------------------------------------------------------------------

    def _rate_start(self) -> None:
        self._rate_started = self.reactor.seconds()
        self._rate_tick()
        self._loop(min(0.05, 1.0 / self.opts.sos_rate), self._rate_tick)

    def _rate_tick(self) -> None:
        o = self.opts
        if self._rate_started is None:
            return
        due = int((self.reactor.seconds() - self._rate_started) * o.sos_rate) + 1
        if o.sos_rate_count:
            due = min(due, o.sos_rate_count)
        while self._rate_done < due:
            self._rate_done += 1
            self.press("trickle")

    def _burst(self) -> None:
        for _ in range(self.opts.sos_burst):
            self.press("burst")

    def press(self, phase: str) -> Press | None:
        """Press SOS on the next terminal that is logged in and has not pressed yet."""
        n = len(self.terms)
        for _ in range(n):
            term = self.terms[self._sos_cursor % n]
            self._sos_cursor += 1
            if not term.pressed and term.state == READY:
                break
        else:
            self.stats.sos_skipped += 1
            return None
        term.pressed = True
        frame = self._build(
            term,
            MsgType.SOS,
            {
                "trigger": 1,
                "status": 0,
                "battery": self.opts.battery,
                "terminal_time": int(time.time()),
                "location": None,
            },
        )
        press = Press(term, term.seq, frame, phase, self.reactor.seconds())
        self.presses.append(press)
        self._pending[(term.idx, press.seq)] = press
        self.stats.sos_pressed += 1
        self._send_press(press)
        return press

    def _send_press(self, press: Press) -> None:
        term = press.term
        if term.state != READY or term.conn is None:
            return
        press.t_last = self.reactor.seconds()
        press.sends += 1
        self.stats.sos_frames += 1
        if press.sends > 1:
            self.stats.sos_resends += 1
        self._send(term, term.conn, press.frame, "sos")

    def _resend_sos(self) -> None:
        now = self.reactor.seconds()
        for press in list(self._pending.values()):
            if now - press.t_last >= self.opts.sos_resend:
                self._send_press(press)

    def _sos_acked(self, term: Term, seq: int) -> None:
        key = (term.idx, seq)
        press = self._pending.pop(key, None)
        if press is None:
            if key in self._acked_keys:
                self.stats.sos_duplicate_acks += 1
            else:
                self.stats.sos_unexpected_acks += 1
            return
        press.ack_s = self.reactor.seconds() - press.t_press
        self._acked_keys.add(key)
        self.stats.sos_acked += 1

    # --- report -----------------------------------------------------------------------

    def report(self, why: str = "done") -> dict[str, Any]:
        """Everything sent and received, SOS latencies, window rates."""
        s = self.stats
        o = self.opts
        w = self._window
        window: dict[str, Any] = {}
        if w and "t1" in w:
            span = w["t1"] - w["t0"]
            acks = w["hb1"] - w["hb0"]
            window = {
                "seconds": round(span, 3),
                "heartbeat_acks": acks,
                "frames_per_s": round(acks / span, 1) if span > 0 else None,
                "fleet_cpu_share": round((w["cpu1"] - w["cpu0"]) / span, 3) if span > 0 else None,
            }
        phases: dict[str, Any] = {}
        for phase in sorted({p.phase for p in self.presses}):
            ps = [p for p in self.presses if p.phase == phase]
            phases[phase] = {
                "pressed": len(ps),
                "acked": sum(1 for p in ps if p.ack_s is not None),
                "latency_ms": percentiles([p.ack_s * 1000 for p in ps if p.ack_s is not None]),
            }
        lat = [p.ack_s * 1000 for p in self.presses if p.ack_s is not None]
        logged_in = sum(1 for t in self.terms if t.logins > 0)
        sos = {
            "pressed": s.sos_pressed,
            "frames_sent": s.sos_frames,
            "resends": s.sos_resends,
            "acked": s.sos_acked,
            "unacked": len(self._pending),
            "duplicate_acks": s.sos_duplicate_acks,
            "unexpected_acks": s.sos_unexpected_acks,
            "skipped": s.sos_skipped,
            "latency_ms": percentiles(lat),
            "phases": phases,
        }
        if o.keep_presses:
            sos["presses"] = [
                {
                    "ident": p.term.ident,
                    "seq": p.seq,
                    "phase": p.phase,
                    "wall": round(p.wall, 6),
                    "sends": p.sends,
                    "ack_ms": None if p.ack_s is None else round(p.ack_s * 1000, 3),
                }
                for p in self.presses
            ]
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        ready = self._ready_at or self.reactor.seconds()
        summary = {
            "why": why,
            "terminals": len(self.terms),
            "logged_in": logged_in,
            "connect_failed": s.connect_failed,
            "login_nacked": s.login_nacked,
            "lost": s.lost,
            "heartbeats_sent": s.hb_sent,
            "heartbeats_acked": s.hb_acked,
            "frames_per_s": window.get("frames_per_s"),
            "sos_pressed": s.sos_pressed,
            "sos_acked": s.sos_acked,
            "sos_unacked": len(self._pending),
            "sos_duplicate_acks": s.sos_duplicate_acks,
            "sos_p50_ms": sos["latency_ms"]["p50"],
            "sos_p99_ms": sos["latency_ms"]["p99"],
        }
        opts = asdict(o)
        opts.pop("idents")
        return {
            "summary": summary,
            "options": opts,
            "nofile": {"soft": soft, "hard": hard},
            "sources": list(o.sources),
            "ramp_s": round(ready - self._started, 3),
            "connects": {
                "attempts": s.connect_attempts,
                "connected": s.connected,
                "failed": s.connect_failed,
                "logged_in": logged_in,
                "login_acks": s.login_acked,
                "login_nacked": s.login_nacked,
                "lost": s.lost,
                "reconnects": s.reconnects,
            },
            "frames_sent": {**dict(s.sent), "heartbeat": s.hb_sent},
            "frames_received": {**dict(s.received), "heartbeat_ack": s.hb_acked},
            "acks_by_type": {**dict(s.acks), "heartbeat": s.hb_acked},
            "nacks": dict(s.nacks),
            "bad_crc": s.bad_crc,
            "noise_bytes": s.noise_bytes,
            "settings_received": s.settings,
            "care": {"prompts": s.care_prompts, "answers": s.care_answers},
            "heartbeats": {"sent": s.hb_sent, "acked": s.hb_acked},
            "window": window,
            "sos": sos,
            "cpu_s": round(_cpu_seconds(), 3),
            "wall_s": round(self.reactor.seconds() - self._started, 3),
        }


def send_now(transport: Any, data: bytes) -> None:
    """Write ``data``, straight to the socket when nothing is queued (saves two epoll calls).

    A load generator must be cheaper than the server it loads; Twisted's ``write``
    always defers the send to the next writable event.  Whatever the socket does
    not take at once goes through ``transport.write`` as usual, so order is kept.
    """
    if (
        FAST_SEND
        and not transport.dataBuffer
        and not transport._tempDataBuffer
        and transport.connected
        and not transport.disconnecting
    ):
        try:
            sent = transport.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            sent = 0  # let Twisted see (and report) the error on its own write
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def raise_nofile() -> tuple[int, int]:
    """Raise the open-files soft limit to the hard limit; returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def parse_args(argv: list[str] | None = None) -> tuple[FleetOptions, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="python -m simulators.fleet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--server", required=True, help="HOST:PORT (loopback only)")
    p.add_argument("--count", type=int, required=True, help=f"terminals, 1-{MAX_COUNT}")
    p.add_argument("--heartbeat", type=float, default=60.0, help="seconds between heartbeats")
    p.add_argument("--duration", type=float, required=True, help="seconds of steady state")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--sources", help="comma-separated loopback source addresses")
    src.add_argument("--source-count", type=int, default=0, help="use 127.0.0.2 .. 127.0.0.K+1")
    p.add_argument("--sos-rate", type=float, default=0.0, help="SOS presses per second")
    p.add_argument("--sos-rate-at", type=float, default=0.0, help="start of the trickle (s)")
    p.add_argument("--sos-count", type=int, default=0, help="stop the trickle after N presses")
    p.add_argument("--sos-burst", type=int, default=0, help="N presses at once")
    p.add_argument("--sos-at", type=float, default=0.0, help="when the burst comes (s)")
    p.add_argument("--sos-resend", type=float, default=5.0)
    p.add_argument("--stream", action="store_true", help="one heartbeat in flight per terminal")
    p.add_argument("--pipelined", type=int, default=0, help="stream with K heartbeats in flight")
    p.add_argument("--warmup", type=float, default=2.0, help="measurement window starts after")
    ids = p.add_mutually_exclusive_group()
    ids.add_argument("--idents-from", help="file with one ident per line")
    ids.add_argument("--ident-prefix", default="86")
    p.add_argument("--first-index", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=200, help="connects/logins at once")
    p.add_argument("--ramp-timeout", type=float, default=120.0)
    p.add_argument("--drain", type=float, default=15.0, help="wait this long for SOS acks")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cpu", type=int, default=None, help="pin the fleet to this CPU")
    p.add_argument("--no-presses", action="store_true", help="leave per-press rows out")
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    host, _, port = args.server.rpartition(":")
    if not host or not port.isdigit():
        p.error("--server must be HOST:PORT")
    idents = None
    if args.idents_from:
        with open(args.idents_from) as fh:
            idents = [line.strip() for line in fh if line.strip()]
    opts = FleetOptions(
        host=host,
        port=int(port),
        count=args.count,
        heartbeat=args.heartbeat,
        duration=args.duration,
        sources=tuple(s.strip() for s in args.sources.split(",")) if args.sources else (),
        source_count=args.source_count,
        sos_rate=args.sos_rate,
        sos_rate_at=args.sos_rate_at,
        sos_rate_count=args.sos_count,
        sos_burst=args.sos_burst,
        sos_at=args.sos_at,
        sos_resend=args.sos_resend,
        stream=args.stream or args.pipelined > 0,
        pipelined=max(1, args.pipelined),
        warmup=args.warmup,
        idents=idents,
        ident_prefix=args.ident_prefix,
        first_index=args.first_index,
        concurrency=args.concurrency,
        ramp_timeout=args.ramp_timeout,
        drain=args.drain,
        seed=args.seed,
        keep_presses=not args.no_presses,
    )
    try:
        opts.check()
    except ValueError as exc:
        p.error(str(exc))
    return opts, args


def main(argv: list[str] | None = None) -> int:
    opts, args = parse_args(argv)
    if args.cpu is not None:
        import os

        os.sched_setaffinity(0, {args.cpu})
    soft, _hard = raise_nofile()
    if opts.count + 64 > soft:
        print(f"fleet: {opts.count} terminals need more than {soft} open files", file=sys.stderr)
        return 2
    from twisted.internet import reactor

    fleet = Fleet(reactor, opts)
    fleet.on_event.append(lambda line: print(json.dumps(line), flush=True))
    result: dict[str, Any] = {}

    def finished(report: dict[str, Any]) -> None:
        result.update(report)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(report, fh, indent=1)
        reactor.callLater(0.1, reactor.stop)

    def failed(failure: Any) -> None:
        print(failure.getTraceback(), file=sys.stderr)
        reactor.stop()

    reactor.callWhenRunning(lambda: fleet.run().addCallbacks(finished, failed))
    reactor.run()
    if not result:
        return 1
    s = result["summary"]
    return 0 if s["sos_unacked"] == 0 and s["logged_in"] == s["terminals"] else 1


if __name__ == "__main__":
    sys.exit(main())
