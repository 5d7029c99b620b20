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

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from dispatch import events as ev
from dispatch import logs, metrics
from dispatch.protocol.base import DecodeError, Inbound, Outcome, StreamCodec

log = logs.get(__name__)

LOGIN_TIMEOUT_S = 60.0
MAX_ERROR_LOGS = 20  # per connection: a garbage flood must not flood the log too
# Events whose outcome decides the session (a tuple: ``A | B`` would build a new union
# object on every call).
_SESSION_EVENTS = (ev.Login, ev.Register)


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
    """One terminal's TCP connection, for any protocol's codec.

    Frames are answered strictly in arrival order. A frame whose outcome is a Deferred
    still waiting (an SOS being committed, a login being looked up) holds back every
    later frame of the connection until it is answered; those wait in ``_queue``, which
    exists only while something waits. Decode errors are answered as they are found,
    before the frames of the same read.
    """

    # One instance per connection (~19,000 per process). Twisted's Protocol classes have
    # no __slots__, so instances keep a __dict__; the slots still make each of our own
    # attributes cheaper, and ``transport``/``connected`` (set by makeConnection) are
    # slots too so that __dict__ normally stays empty.
    __slots__ = (
        "transport",
        "connected",
        "registry",
        "codec",
        "gateway",
        "clock",
        "protocol",
        "peer",
        "device",
        "_queue",
        "_busy",
        "_closed",
        "_errors_logged",
        "_out_seq",
        "_login_timer",
        "_out",
    )

    def __init__(
        self, codec: StreamCodec, gateway: Any, clock: Any, registry: set | None = None
    ) -> None:
        self.transport: Any = None  # Protocol's class defaults, which the slots hide
        self.connected = 0
        self.registry = registry if registry is not None else set()
        self.codec = codec
        self.gateway = gateway
        self.clock = clock
        self.protocol = codec.protocol
        self.peer = "?"
        self.device = None
        # Frames waiting behind an unanswered one; None while nothing waits (an empty
        # deque is ~0.6 KB, and most connections never need one).
        self._queue: deque[tuple[Inbound, float]] | None = None
        self._busy = False  # an outcome is still a Deferred: later frames must wait
        self._closed = False
        self._errors_logged = 0
        self._out_seq = 0
        self._login_timer: Any = None
        # While a read with several frames is answered, its replies are collected here
        # and written with one transport.write (see _write).
        self._out: list[bytes] | None = None

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
        self._cancel_login_timer()
        self._queue = None
        self.gateway.unbind(self)

    def _cancel_login_timer(self) -> None:
        # Dropping the reference too: a cancelled DelayedCall is ~0.3 KB per connection.
        if self._login_timer is not None:
            if self._login_timer.active():
                self._login_timer.cancel()
            self._login_timer = None

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
            self._flush()  # replies collected so far go out before the connection closes
            self.transport.loseConnection()

    def _write(self, data: bytes) -> None:
        """Write now, or add to the replies of the read being answered (same order)."""
        if self._out is None:
            self.transport.write(data)
        else:
            self._out.append(data)

    def _flush(self) -> None:
        out = self._out
        if out:
            self.transport.write(b"".join(out))
            out.clear()

    # --- inbound --------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Decode a read and answer its frames (see the class docstring for the order)."""
        if self._closed:
            return
        items = self.codec.feed(data)
        if not items and not self._queue:
            return
        if len(items) == 1 or self._out is not None:
            self._take(items)
            return
        # Several frames in one read (pipelining, a burst after a stall): one write.
        self._out = out = []
        try:
            self._take(items)
        finally:
            self._out = None
            if out:
                self.transport.write(b"".join(out))

    def _take(self, items: list[Inbound | DecodeError]) -> None:
        """Answer decode errors at once, then the frames in order (queued if one waits)."""
        now = self.clock.seconds()
        frames: list[Any] = items
        for item in items:
            if isinstance(item, DecodeError):
                inbound_only = self._errors_first(items)
                if inbound_only is None:
                    return
                frames = inbound_only
                break
        if self._busy or self._queue:
            self._enqueue(frames, 0, now)
            self._pump()
            return
        # Nothing waits: answer in order straight away, without the queue round trip.
        n = len(frames)
        i = 0
        try:
            while i < n:
                if self._closed:
                    return
                inbound = frames[i]
                i += 1
                result = self.gateway.handle(self, inbound)
                if isinstance(result, Deferred):
                    # Queued before the callbacks are added: an already-fired Deferred
                    # answers and resumes at once, and must find them waiting.
                    self._enqueue(frames, i, now)
                    i = n
                    self._wait(result, inbound, now)
                    return
                self._answer(result, inbound, now)
        except BaseException:
            # As when every frame went through the queue: the failed one is gone, the
            # ones after it still wait for the next read.
            self._enqueue(frames, i, now)
            raise

    def _errors_first(self, items: list[Inbound | DecodeError]) -> list[Inbound] | None:
        """Answer the decode errors of a read; its frames, or None after a fatal error."""
        frames: list[Inbound] = []
        for item in items:
            if isinstance(item, DecodeError):
                self._decode_error(item)
                if item.fatal:
                    return None
            else:
                frames.append(item)
        return frames

    def _enqueue(self, frames: list[Inbound], start: int, now: float) -> None:
        if start < len(frames):
            if self._queue is None:
                self._queue = deque()
            self._queue.extend((frames[k], now) for k in range(start, len(frames)))

    def _decode_error(self, err: DecodeError) -> None:
        if err.reason == "sub_packet":
            # JT/T 808 acknowledges each piece of a split message; not an error.
            if err.reply:
                self._write(err.reply)
            return
        report_error(self.protocol, self.peer, err, self._errors_logged)
        self._errors_logged += 1
        if err.reply:
            self._write(err.reply)
        if err.fatal:
            self.close(f"decode_{err.reason}")

    def _pump(self) -> None:
        queue = self._queue
        while queue and not self._busy and not self._closed:
            inbound, arrived = queue.popleft()
            result = self.gateway.handle(self, inbound)
            if isinstance(result, Deferred):
                self._wait(result, inbound, arrived)
                return
            self._answer(result, inbound, arrived)
        if not queue and self._queue is queue:
            self._queue = None  # drained: drop the deque until something waits again

    def _wait(self, result: Deferred, inbound: Inbound, arrived: float) -> None:
        """Answer ``inbound`` when its outcome fires; later frames wait until then."""
        self._busy = True
        result.addCallback(self._answer, inbound, arrived)
        result.addErrback(self._failed, inbound)
        result.addBoth(self._resume)

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
            if self._out is None:  # _write, inlined: once per frame
                self.transport.write(data)
            else:
                self._out.append(data)
        event = inbound.event
        if isinstance(event, ev.Sos) and outcome.ok:
            metrics.SOS_ACK_SECONDS.observe(self.clock.seconds() - arrived)
        elif isinstance(event, _SESSION_EVENTS):
            self._after_login(outcome, isinstance(event, ev.Login))

    def _after_login(self, outcome: Outcome, is_login: bool) -> None:
        if outcome.ok:
            if is_login:
                self._cancel_login_timer()
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
        self._write(data)  # behind the replies already collected for this read
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
