"""The native protocol over UDP: one datagram is one frame, replies go to the sender.

Sessions are keyed by device ident, not by address: a terminal behind a
carrier NAT may change source port between datagrams, and the newest
address wins.  Nothing is sent in answer to a datagram that is not one
CRC-checked frame, so the port cannot be used to amplify spoofed traffic.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol

from dispatch import events as ev
from dispatch import logs, metrics
from dispatch.protocol.base import DecodeError, Inbound, Outcome
from dispatch.protocol.native import decode_datagram, encode_command, reply_frame
from dispatch.protocol.transport import report_error

log = logs.get(__name__)


class UdpLink:
    """A native terminal reached over UDP at its most recent source address."""

    protocol = "native"

    def __init__(self, owner: NativeDatagramProtocol, addr: tuple[str, int]) -> None:
        self.owner = owner
        self.addr = addr
        self.peer = f"udp:{addr[0]}:{addr[1]}"
        self.device = None
        self._out_seq = 0

    def send_command(self, command: ev.Command) -> bool:
        """Send a command datagram to the terminal's last address."""
        if self.device is None:
            return False
        self._out_seq = (self._out_seq + 1) & 0xFFFF
        self.owner.send(encode_command(self.device.ident, command, self._out_seq), self.addr)
        return True

    def close(self, reason: str) -> None:
        """UDP has no connection: forgetting the binding is all there is."""
        self.owner.gateway.unbind(self)
        self.device = None


class TokenBucket:
    """Per-source-address datagram budget."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._state: dict[str, tuple[float, float]] = {}

    def allow(self, key: str, now: float) -> bool:
        """Spend one token for ``key`` if it has one."""
        tokens, last = self._state.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if len(self._state) > 100_000:
            self._state.clear()  # bound memory under a spoofed-source flood
        if tokens < 1.0:
            self._state[key] = (tokens, now)
            return False
        self._state[key] = (tokens - 1.0, now)
        return True


class NativeDatagramProtocol(DatagramProtocol):
    """The native protocol over UDP: sessions keyed by device ident."""

    protocol = "native"

    def __init__(self, gateway: Any, clock: Any, rate: float = 20.0) -> None:
        self.gateway = gateway
        self.clock = clock
        self.bucket = TokenBucket(rate, rate * 2)
        self._errors_logged = 0

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        """Write one datagram."""
        if self.transport is not None:
            self.transport.write(data, addr)

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        now = self.clock.seconds()
        if not self.bucket.allow(addr[0], now):
            metrics.DECODE_ERRORS.labels("native_udp", "rate_limited").inc()
            return
        item = decode_datagram(data)
        if isinstance(item, DecodeError):
            report_error("native_udp", f"{addr[0]}:{addr[1]}", item, self._errors_logged)
            self._errors_logged += 1
            if item.reply:  # only well-framed, CRC-checked frames get a NACK
                self.send(item.reply, addr)
            return
        link = self._link_for(item.event, addr)
        result = self.gateway.handle(link, item)
        if isinstance(result, defer.Deferred):
            result.addCallback(self._answer, link, item, now)
            result.addErrback(lambda f: log.error("handler_failed", error=f.getErrorMessage()))
        else:
            self._answer(result, link, item, now)

    def _link_for(self, event: ev.TerminalEvent, addr: tuple[str, int]) -> UdpLink:
        existing = self.gateway.links.get(event.ident)
        if isinstance(existing, UdpLink) and not isinstance(event, ev.Login):
            existing.addr = addr  # follow NAT rebinding
            return existing
        return UdpLink(self, addr)

    def _answer(self, outcome: Outcome | None, link: UdpLink, item: Inbound, arrived: float):
        if outcome is None:
            return
        data = reply_frame(item, outcome)
        if data:
            self.send(data, link.addr)
        if isinstance(item.event, ev.Sos) and outcome.ok:
            metrics.SOS_ACK_SECONDS.observe(self.clock.seconds() - arrived)
        elif isinstance(item.event, ev.Login) and outcome.ok:
            self.gateway.after_login(link)
