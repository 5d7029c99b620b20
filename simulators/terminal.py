"""A simulated one-button terminal, byte-exact to the protocol it speaks.

    python -m simulators.terminal --protocol native --server 127.0.0.1:7700 \\
        --ident 860000000000001 --sos-after 2

It logs in, heartbeats with a draining battery, presses SOS when told and
resends it until acknowledged, answers care checks as told, and reconnects
with backoff when its network drops.  Every frame sent or received is one JSON
line on stdout; the last line is a summary.  Exit status 1 means an SOS was
pressed and never acknowledged, or the server refused the login.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from typing import Any, TextIO

from twisted.internet import protocol as tproto
from twisted.internet import task

from dispatch import events as ev

SOS_RETRY_S = 5.0
JT808_AUTH = 0x0102
JT808_SET_PARAMS = 0x8103
JT808_TEXT = 0x8300
_CARE_TEXT = re.compile(r"^CARE,(\d+)#$")
LOGIN_RETRY_S = 5.0
MAX_BACKOFF_S = 30.0


def make_codec(proto: str, ident: str, edition: int = 2013) -> Any:
    """The terminal-side codec for ``proto``."""
    if proto == "native":
        from simulators.native_codec import NativeTerminalCodec

        return NativeTerminalCodec(ident)
    if proto == "gt06":
        from simulators.gt06_codec import Gt06TerminalCodec

        return Gt06TerminalCodec(ident)
    from simulators.jt808_codec import Jt808TerminalCodec

    return Jt808TerminalCodec(ident, edition)


def _care_round(msg: dict[str, Any]) -> int | None:
    """The round id of a GT06 ``CARE,<n>#`` command, if this is one."""
    match = _CARE_TEXT.match(str(msg.get("text", "")))
    return int(match.group(1)) if match else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


class SimTerminal:
    """Terminal behaviour, independent of TCP or UDP (``send`` is plugged in)."""

    def __init__(self, codec: Any, clock: Any, opts: argparse.Namespace, out: TextIO) -> None:
        self.codec = codec
        self.clock = clock
        self.opts = opts
        self.out = out
        self.send_bytes: Any = None
        self.logged_in = False
        self.refused = False
        self.battery = opts.battery
        self.heartbeat_interval = opts.heartbeat
        self.sos_frame: bytes | None = None
        self.sos_key: Any = None
        self.sos_acked = False
        self.sos_sent_at: float | None = None
        self.sos_ack_ms: float | None = None
        self.counts = {"tx": 0, "rx": 0, "connects": 0}
        self._hb = task.LoopingCall(self.heartbeat)
        self._hb.clock = clock
        self._retry: Any = None
        self.on_done: Any = None
        self.finished = False

    # --- output ---------------------------------------------------------------------

    def emit(self, direction: str, kind: str, **fields: Any) -> None:
        """One JSON line per frame or event (nothing after the summary)."""
        if self.finished:
            return
        line = {"dir": direction, "type": kind, "t": round(self.clock.seconds(), 3)}
        line.update({k: _jsonable(v) for k, v in fields.items()})
        self.out.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.out.flush()

    def send(self, data: bytes, kind: str, **fields: Any) -> None:
        """Write a frame, if connected, and log it."""
        if self.send_bytes is None:
            return
        self.counts["tx"] += 1
        self.emit("tx", kind, bytes=len(data), **fields)
        self.send_bytes(data)

    # --- connection events ----------------------------------------------------------

    def connected(self, send: Any) -> None:
        """The link is up: log in (and keep trying over UDP until acknowledged)."""
        self.send_bytes = send
        self.counts["connects"] += 1
        self.emit("event", "connected", n=self.counts["connects"])
        self.login()

    def login(self) -> None:
        if self.logged_in or self.send_bytes is None:
            return
        self.send(self.codec.login(), "login")
        self._schedule_retry(LOGIN_RETRY_S, self.login)

    def disconnected(self) -> None:
        """The link dropped: stop heartbeats; SOS resends wait for the next login."""
        self.send_bytes = None
        self.logged_in = False
        if self._hb.running:
            self._hb.stop()
        self.emit("event", "disconnected")

    def _schedule_retry(self, delay: float, fn: Any) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = self.clock.callLater(delay, fn)

    # --- periodic behaviour ---------------------------------------------------------

    def heartbeat(self) -> None:
        """Send a heartbeat; the battery drains 1% every heartbeat down to 5%."""
        self.battery = max(5, self.battery - 1)
        self.send(
            self.codec.heartbeat(self.battery, False, self.opts.signal),
            "heartbeat",
            battery=self.battery,
        )

    def press_sos(self) -> None:
        """Press the button: build the SOS once, then resend the same bytes until acked."""
        trigger = ev.SosTrigger.FALL if self.opts.sos_trigger == "fall" else ev.SosTrigger.BUTTON
        loc = None
        if self.opts.lat is not None and self.opts.lon is not None:
            loc = ev.Location(self.opts.lat, self.opts.lon, 10)
        self.sos_frame, self.sos_key = self.codec.sos(trigger, loc, time.time(), self.battery)
        self.sos_sent_at = self.clock.seconds()
        self.emit("event", "sos_pressed", trigger=trigger.name.lower())
        self.resend_sos()

    def resend_sos(self) -> None:
        if self.sos_acked or self.sos_frame is None:
            return
        if self.logged_in:
            self.send(self.sos_frame, "sos", key=self.sos_key)
        self.clock.callLater(self.opts.sos_retry, self.resend_sos)

    # --- inbound --------------------------------------------------------------------

    def received(self, data: bytes) -> None:
        """Parse and react to what the server sent."""
        for msg in self.codec.feed(data):
            self.counts["rx"] += 1
            fields = {k: v for k, v in msg.items() if k != "type"}
            self.emit("rx", msg["type"], **fields)
            self.react(msg)

    def react(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "login_ack" or (kind == "register_ack" and self._registered(msg)):
            self._logged_in()
        elif kind == "ack" and msg.get("reply_id") == JT808_AUTH:
            if msg.get("result") == 0:
                self._logged_in()
            else:
                self.refused = True
                self.emit("event", "login_refused", reason=msg.get("result"))
                self.finish()
        elif (kind == "login_nack" and msg.get("reason") == "unknown_device") or (
            kind == "register_ack" and msg.get("result")
        ):
            self.refused = True
            self.emit("event", "login_refused", reason=msg.get("reason", msg.get("result")))
            self.finish()
        elif kind in ("ack",) and self.sos_key is not None and msg.get("key") == self.sos_key:
            if not self.sos_acked:
                self.sos_acked = True
                self.sos_ack_ms = round((self.clock.seconds() - self.sos_sent_at) * 1000, 1)
                self.emit("event", "sos_acked", ms=self.sos_ack_ms)
                if self.opts.duration is None and not self.opts.care_answer:
                    self.clock.callLater(0.2, self.finish)
        elif kind == "settings":
            self.heartbeat_interval = msg.get("heartbeat_interval_s") or self.heartbeat_interval
            self._command_ack(msg)
        elif kind in ("care_prompt", "command", "text"):
            self._command_ack(msg)
            self._care(msg)

    def _registered(self, msg: dict[str, Any]) -> bool:
        # JT/T 808: registration succeeded; authenticate with the code, then wait for its ack.
        if msg.get("result") == 0 and hasattr(self.codec, "authenticate"):
            self.send(self.codec.authenticate(msg["auth_code"]), "authenticate")
        return False

    def _logged_in(self) -> None:
        if self.logged_in:
            return
        self.logged_in = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self.emit("event", "logged_in")
        if not self._hb.running:
            self._hb.start(self.heartbeat_interval, now=True)
        if self.sos_frame is not None and not self.sos_acked:
            self.send(self.sos_frame, "sos", key=self.sos_key, resend=True)

    def _command_ack(self, msg: dict[str, Any]) -> None:
        """Confirm a command the way this protocol's terminals do."""
        proto = getattr(self.opts, "protocol", "native")
        if proto == "native":
            ref_type = 0x83 if msg["type"] == "settings" else 0x82
            self.send(self.codec.command_ack(ref_type, msg["seq"]), "ack", ref_seq=msg["seq"])
        elif proto == "jt808":
            msg_id = JT808_SET_PARAMS if msg["type"] == "settings" else JT808_TEXT
            self.send(
                self.codec.general_response(msg["serial"], msg_id, 0),
                "general_response",
                ref_serial=msg["serial"],
            )
        elif proto == "gt06" and not _care_round(msg):
            self.send(self.codec.string_reply("OK!", msg["server_flag"]), "string_reply")

    def _care(self, msg: dict[str, Any]) -> None:
        answer = self.opts.care_answer
        round_id = msg.get("round_id", _care_round(msg))
        if answer in (None, "ignore") or round_id is None:
            return
        value = ev.CareAnswer.OK if answer == "ok" else ev.CareAnswer.HELP
        frame = self.codec.care_answer(round_id, value)
        if frame is not None:
            self.clock.callLater(
                0.5, self.send, frame, "care_answer", round_id=round_id, answer=answer
            )

    def finish(self) -> None:
        """Print the summary and stop."""
        if self.on_done is not None:
            done, self.on_done = self.on_done, None
            self.emit(
                "summary",
                "summary",
                sos_pressed=self.sos_frame is not None,
                sos_acked=self.sos_acked,
                sos_ack_ms=self.sos_ack_ms,
                refused=self.refused,
                **self.counts,
            )
            self.finished = True
            done()

    @property
    def ok(self) -> bool:
        """False if the login was refused or a pressed SOS was never acknowledged."""
        return not self.refused and (self.sos_frame is None or self.sos_acked)


class _Stream(tproto.Protocol):
    def __init__(self, term: SimTerminal, owner: TcpDriver) -> None:
        self.term = term
        self.owner = owner

    def connectionMade(self) -> None:
        self.owner.current = self
        self.owner.backoff = 1.0
        self.term.connected(self.transport.write)

    def dataReceived(self, data: bytes) -> None:
        self.term.received(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.owner.current = None
        self.term.disconnected()
        self.owner.reconnect()


class TcpDriver(tproto.ClientFactory):
    """Keeps one TCP connection up, reconnecting with jittered exponential backoff."""

    def __init__(self, reactor: Any, host: str, port: int, term: SimTerminal) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.term = term
        self.backoff = 1.0
        self.current: _Stream | None = None
        self.stopping = False

    def start(self) -> None:
        self.reactor.connectTCP(self.host, self.port, self, timeout=10)

    def buildProtocol(self, addr: Any) -> _Stream:
        return _Stream(self.term, self)

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.term.emit("event", "connect_failed", error=reason.getErrorMessage())
        self.reconnect()

    def reconnect(self) -> None:
        if self.stopping:
            return
        delay = self.backoff * random.uniform(0.8, 1.2)
        self.backoff = min(MAX_BACKOFF_S, self.backoff * 2)
        self.term.emit("event", "reconnect_in", seconds=round(delay, 2))
        self.reactor.callLater(delay, self.start)

    def drop(self) -> None:
        """Simulate losing the network: abort the connection."""
        if self.current is not None:
            self.term.emit("event", "network_lost")
            self.current.transport.abortConnection()

    def stop(self) -> None:
        self.stopping = True
        if self.current is not None:
            self.current.transport.loseConnection()


class UdpDriver(tproto.DatagramProtocol):
    """Native terminal over UDP: one frame per datagram."""

    def __init__(self, reactor: Any, host: str, port: int, term: SimTerminal) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.term = term
        self.listening: Any = None

    def start(self) -> None:
        self.listening = self.reactor.listenUDP(0, self, interface="127.0.0.1")

    def startProtocol(self) -> None:
        self.transport.connect(self.host, self.port)
        self.term.connected(self.transport.write)

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.term.received(data)

    def connectionRefused(self) -> None:
        self.term.emit("event", "port_unreachable")

    def drop(self) -> None:
        self.term.emit("event", "network_lost")

    def stop(self) -> None:
        if self.listening is not None:
            self.listening.stopListening()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of INTERFACES.md plus a few tuning flags."""
    p = argparse.ArgumentParser(
        prog="python -m simulators.terminal",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--protocol", choices=("native", "gt06", "jt808"), default="native")
    p.add_argument("--server", required=True, help="HOST:PORT")
    p.add_argument("--ident", required=True, help="native id, GT06 IMEI or JT/T 808 phone")
    p.add_argument("--udp", action="store_true", help="native protocol over UDP")
    p.add_argument("--jt808-edition", type=int, choices=(2013, 2019), default=2013)
    p.add_argument("--sos-after", type=float, default=None, help="press SOS after N seconds")
    p.add_argument("--sos-trigger", choices=("button", "fall"), default="button")
    p.add_argument("--sos-retry", type=float, default=SOS_RETRY_S)
    p.add_argument("--care-answer", choices=("ok", "help", "ignore"), default=None)
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="exit after N seconds (default: after the SOS ack, or never)",
    )
    p.add_argument("--heartbeat", type=float, default=60.0, help="until the server says")
    p.add_argument("--battery", type=int, default=90)
    p.add_argument("--signal", type=int, default=70)
    p.add_argument("--lat", type=float, default=None)
    p.add_argument("--lon", type=float, default=None)
    p.add_argument(
        "--drop-after",
        type=float,
        default=None,
        help="lose the network once after N seconds (reconnects with backoff)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="give up waiting for an SOS ack after N seconds",
    )
    args = p.parse_args(argv)
    if args.udp and args.protocol != "native":
        p.error("--udp is only for the native protocol")
    host, _, port = args.server.rpartition(":")
    if not host or not port.isdigit():
        p.error("--server must be HOST:PORT")
    args.host, args.port = host, int(port)
    return args


def run(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    """Run one terminal on the global reactor; returns the exit status."""
    from twisted.internet import reactor

    opts = parse_args(argv)
    codec = make_codec(opts.protocol, opts.ident, opts.jt808_edition)
    term = SimTerminal(codec, reactor, opts, out)
    driver_cls = UdpDriver if opts.udp else TcpDriver
    driver = driver_cls(reactor, opts.host, opts.port, term)

    def done() -> None:
        driver.stop()
        reactor.callLater(0.1, reactor.stop)

    term.on_done = done
    reactor.callWhenRunning(driver.start)
    if opts.sos_after is not None:
        reactor.callLater(opts.sos_after, term.press_sos)
    if opts.drop_after is not None:
        reactor.callLater(opts.drop_after, driver.drop)
    if opts.duration is not None:
        reactor.callLater(opts.duration, term.finish)
    elif opts.sos_after is not None:
        reactor.callLater(opts.sos_after + opts.timeout, term.finish)
    reactor.run()
    return 0 if term.ok else 1


if __name__ == "__main__":
    sys.exit(run())
