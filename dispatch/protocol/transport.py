"""Twisted transports shared by every terminal protocol.

A TCP connection owns one codec and feeds it bytes; decoded events go to the
gateway one at a time (a login must finish before the next frame is judged),
and each outcome is encoded back by the codec.  The native protocol also
listens on UDP (see ``native_udp``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from dispatch import events as ev
from dispatch import logs, metrics
from dispatch.protocol.base import DecodeError, Inbound, Outcome, StreamCodec

log = logs.get(__name__)

LOGIN_TIMEOUT_S = 60.0
MAX_ERROR_LOGS = 20  # per connection: a garbage flood must not flood the log too


def report_error(protocol: str, peer: str, err: DecodeError, logged: int) -> None:
    """Count a decode error and log it (callers cap how many they log)."""
    metrics.DECODE_ERRORS.labels(protocol, err.reason).inc()
    if logged < MAX_ERROR_LOGS:
        log.info(
            "decode_error",
            protocol=protocol,
            peer=peer,
            reason=err.reason,
            detail=err.detail,
            fatal=err.fatal,
        )


class TerminalStreamProtocol(Protocol):
    """One terminal's TCP connection, for any protocol's codec."""

    def __init__(
        self, codec: StreamCodec, gateway: Any, clock: Any, registry: set | None = None
    ) -> None:
        self.registry = registry if registry is not None else set()
        self.codec = codec
        self.gateway = gateway
        self.clock = clock
        self.protocol = codec.protocol
        self.peer = "?"
        self.device = None
        self._queue: deque[tuple[Inbound, float]] = deque()
        self._busy = False
        self._closed = False
        self._errors_logged = 0
        self._out_seq = 0
        self._login_timer: Any = None

    # --- connection lifecycle -------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        self.registry.add(self)
        metrics.CONNECTIONS.labels(self.protocol).inc()
        metrics.CONNECTIONS_OPEN.labels(self.protocol).inc()
        self._login_timer = self.clock.callLater(LOGIN_TIMEOUT_S, self._login_timeout)

    def connectionLost(self, reason: Failure = None) -> None:
        self._closed = True
        self.registry.discard(self)
        metrics.CONNECTIONS_OPEN.labels(self.protocol).dec()
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()
        self._queue.clear()
        self.gateway.unbind(self)

    def _login_timeout(self) -> None:
        self._login_timer = None
        if self.device is None:
            log.info("login_timeout", protocol=self.protocol, peer=self.peer)
            self.close("login_timeout")

    def close(self, reason: str) -> None:
        """Drop this connection after what is already written has been sent."""
        if not self._closed:
            self._closed = True
            log.info("connection_closed", protocol=self.protocol, peer=self.peer, reason=reason)
            self.transport.loseConnection()

    # --- inbound --------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        now = self.clock.seconds()
        for item in self.codec.feed(data):
            if isinstance(item, DecodeError):
                self._decode_error(item)
                if item.fatal:
                    return
            else:
                self._queue.append((item, now))
        self._pump()

    def _decode_error(self, err: DecodeError) -> None:
        if err.reason == "sub_packet":
            # JT/T 808 acknowledges each piece of a split message; not an error.
            if err.reply:
                self.transport.write(err.reply)
            return
        report_error(self.protocol, self.peer, err, self._errors_logged)
        self._errors_logged += 1
        if err.reply:
            self.transport.write(err.reply)
        if err.fatal:
            self.close(f"decode_{err.reason}")

    def _pump(self) -> None:
        while self._queue and not self._busy and not self._closed:
            inbound, arrived = self._queue.popleft()
            result = self.gateway.handle(self, inbound)
            if isinstance(result, defer.Deferred):
                self._busy = True
                result.addCallback(self._answer, inbound, arrived)
                result.addErrback(self._failed, inbound)
                result.addBoth(self._resume)
                return
            self._answer(result, inbound, arrived)

    def _resume(self, _: Any) -> None:
        self._busy = False
        self._pump()

    def _failed(self, failure: Failure, inbound: Inbound) -> None:
        log.error(
            "handler_failed",
            protocol=self.protocol,
            peer=self.peer,
            event=type(inbound.event).__name__,
            error=failure.getErrorMessage(),
        )

    def _answer(self, outcome: Outcome | None, inbound: Inbound, arrived: float) -> None:
        if outcome is None or self._closed:
            return
        data = self.codec.reply(inbound, outcome)
        if data:
            self.transport.write(data)
        event = inbound.event
        if isinstance(event, ev.Sos) and outcome.ok:
            metrics.SOS_ACK_SECONDS.observe(self.clock.seconds() - arrived)
        elif isinstance(event, ev.Login | ev.Register):
            self._after_login(outcome, isinstance(event, ev.Login))

    def _after_login(self, outcome: Outcome, is_login: bool) -> None:
        if outcome.ok:
            if is_login:
                if self._login_timer is not None and self._login_timer.active():
                    self._login_timer.cancel()
                self.gateway.after_login(self)
        elif outcome.reason == ev.Reject.UNKNOWN_DEVICE:
            self.close("unknown_device")

    # --- outbound -------------------------------------------------------------------

    def send_command(self, command: ev.Command) -> bool:
        """Encode and send a command; False if the codec cannot carry it."""
        if self._closed or self.device is None:
            return False
        self._out_seq = (self._out_seq + 1) & 0xFFFF
        data = self.codec.command(self.device.ident, command, self._out_seq)
        if data is None:
            return False
        self.transport.write(data)
        return True


class TerminalStreamFactory(Factory):
    """Builds a protocol with a fresh codec per connection."""

    def __init__(self, codec_factory: Callable[[], StreamCodec], gateway: Any, clock: Any):
        self.codec_factory = codec_factory
        self.gateway = gateway
        self.clock = clock
        self.connections: set[TerminalStreamProtocol] = set()

    def buildProtocol(self, addr: Any) -> TerminalStreamProtocol:
        return TerminalStreamProtocol(
            self.codec_factory(), self.gateway, self.clock, self.connections
        )

    def close_all(self, reason: str) -> None:
        """Close every connection this factory made (shutdown)."""
        for conn in list(self.connections):
            conn.close(reason)
