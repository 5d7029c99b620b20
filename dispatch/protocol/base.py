"""The contract between wire protocols and the shared session layer.

A protocol is a :class:`StreamCodec`: one instance per connection, holding the
reassembly buffer.  ``feed`` turns bytes into :class:`Inbound` events or
:class:`DecodeError` reports; ``reply`` and ``command`` turn the gateway's
decisions back into that protocol's bytes.  Nothing here touches storage or
escalation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol as TypingProtocol

from dispatch.events import Command, Reject, TerminalEvent


@dataclass(frozen=True, slots=True)
class Inbound:
    """One decoded frame: the protocol-neutral event plus what a reply needs.

    ``ctx`` is private to the codec that produced it (sequence/serial numbers,
    message ids); the session layer passes it back untouched.
    """

    event: TerminalEvent
    ctx: object = None


@dataclass(frozen=True, slots=True)
class DecodeError:
    """A frame or run of bytes that could not be used.

    ``reason`` is a short metric label (``bad_crc``, ``bad_length``, ``noise``,
    ``unknown_type``, ``malformed``, ``oversized``, ``bad_escape`` ...).
    ``fatal`` means the stream cannot be trusted any more and the connection
    should be dropped.  ``reply`` optionally holds bytes to send back (for
    example a NACK for a well-framed message of unknown type).
    """

    reason: str
    fatal: bool = False
    detail: str = ""
    reply: bytes | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """The gateway's answer to one inbound event, for the codec to encode."""

    ok: bool
    reason: Reject | None = None
    server_time: float = 0.0
    auth_code: str | None = None

    @classmethod
    def accept(cls, server_time: float = 0.0, auth_code: str | None = None) -> Outcome:
        return cls(True, None, server_time, auth_code)

    @classmethod
    def reject(cls, reason: Reject, server_time: float = 0.0) -> Outcome:
        return cls(False, reason, server_time)


class StreamCodec(TypingProtocol):
    """Per-connection encoder/decoder for one terminal protocol."""

    protocol: str
    """Short name used in metrics and the device record: ``native``, ``gt06``, ``jt808``."""

    def feed(self, data: bytes) -> list[Inbound | DecodeError]:
        """Consume received bytes; return every complete frame's result in order."""
        ...

    def reply(self, inbound: Inbound, outcome: Outcome) -> bytes | None:
        """Bytes answering ``inbound`` (ack/nack/registration reply), or None for no reply."""
        ...

    def command(self, ident: str, command: Command, seq: int) -> bytes | None:
        """Bytes carrying ``command`` to the terminal, or None if the protocol cannot carry it."""
        ...
