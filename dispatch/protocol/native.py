"""Native protocol codec: stream reassembly, frame checks, events and replies.

Resynchronisation (documented in docs/protocol.md): bytes before a magic are
noise; a frame whose version, length or CRC is wrong is dropped by skipping
its magic and searching again.  A stream that yields only noise for
``max_noise`` bytes (``max_noise_at_start`` before its first good frame)
is reported fatal so the connection is dropped.
"""

from __future__ import annotations

import re
import struct
from binascii import crc_hqx
from dataclasses import dataclass
from typing import Any

from dispatch import events as ev
from dispatch.protocol import native_format as fmt
from dispatch.protocol.base import DecodeError, Inbound, Outcome
from dispatch.protocol.native_format import MsgType

# Hand-checked fast path for the header; tests pin it to the construct declaration.
_HEADER = struct.Struct(">2sBHB16sI")
# The same header without magic and version (check_frame has already checked both):
# what the per-frame path unpacks, one allocation fewer. Pinned to _HEADER by a test.
_HEADER_FIELDS = struct.Struct(">3xHB16sI")
# ACK is the most frequent frame we build (one per heartbeat); construct's build costs
# ~40 us, this ~2 us. Tests pin it byte for byte to the construct declaration.
_ACK = struct.Struct(">2sBHB16sIBII")
_ACK_LEN = 9
_CRC_INIT = 0xFFFF  # fmt.crc16 is crc_hqx(data, 0xFFFF); called inline on the per-frame path
# Module constants for the per-frame path (a global is one lookup, fmt.X two).
_MAGIC = fmt.MAGIC
_VERSION = fmt.VERSION
_HEADER_SIZE = fmt.HEADER_SIZE
_OVERHEAD = fmt.OVERHEAD

# Message types as plain ints: reading an IntEnum member costs ~150 ns in Python 3.11,
# and the per-frame path compared against several of them for every frame.
_T_LOGIN = int(MsgType.LOGIN)
_T_HEARTBEAT = int(MsgType.HEARTBEAT)
_T_SOS = int(MsgType.SOS)
_T_CARE_ANSWER = int(MsgType.CARE_ANSWER)
_T_LOCATION = int(MsgType.LOCATION)
_T_LOGOUT = int(MsgType.LOGOUT)
_T_ACK = int(MsgType.ACK)
_T_NACK = int(MsgType.NACK)
# Types a terminal may send: every declared payload but the server-only commands.
_INBOUND_TYPES = frozenset(
    int(t) for t in fmt.PAYLOADS_C if t not in (MsgType.CARE_PROMPT, MsgType.SETTINGS)
)
_NO_REPLY_TYPES = frozenset((_T_ACK, _T_NACK))  # a terminal's answer to our command

# The heartbeat without location: 3 payload bytes (battery, status, signal), decoded by
# hand; tests pin it to the construct declaration for every status byte.
_HB_SHORT_LEN = 3
_HB_SHORT_END = fmt.HEADER_SIZE + _HB_SHORT_LEN
_HB_BATTERY = fmt.HEADER_SIZE
_HB_STATUS = fmt.HEADER_SIZE + 1
_HB_SIGNAL = fmt.HEADER_SIZE + 2
_UNKNOWN_U8 = fmt.UNKNOWN_U8
_CHARGING = fmt.STATUS_CHARGING
_HAS_LOCATION = fmt.STATUS_HAS_LOCATION

# A usable ident: printable ASCII without space, NUL-padded to 16 bytes (NULs only at the
# end). One C-level match instead of a Python generator over 16 bytes.
_IDENT_OK = re.compile(rb"[\x21-\x7e]+\x00*")


@dataclass(frozen=True, slots=True)
class FrameRef:
    """What a reply needs to know about the frame it answers."""

    msg_type: int
    seq: int
    ident: str


def _location(block: Any) -> ev.Location | None:
    if block is None:
        return None
    acc = None if block.accuracy_m == fmt.UNKNOWN_ACCURACY else block.accuracy_m
    return ev.Location(block.lat_e6 / 1e6, block.lon_e6 / 1e6, acc)


def _percent(value: int) -> int | None:
    return None if value == fmt.UNKNOWN_U8 else min(value, 100)


def _event(msg_type: int, ident: str, seq: int, p: Any) -> ev.TerminalEvent | None:
    """Map a parsed payload to its protocol-neutral event."""
    if msg_type == _T_HEARTBEAT:
        return ev.Heartbeat(
            ident,
            _percent(p.battery),
            fmt.is_charging(p.status),
            _percent(p.signal),
            _location(p.location),
        )
    if msg_type == _T_SOS:
        trigger = ev.SosTrigger(p.trigger) if p.trigger in (1, 2, 3) else ev.SosTrigger.OTHER
        return ev.Sos(
            ident,
            seq,
            trigger,
            _location(p.location),
            float(p.terminal_time) if p.terminal_time else None,
            _percent(p.battery),
        )
    if msg_type == _T_LOGIN:
        return ev.Login(ident, p.firmware, p.protocol_version)
    if msg_type == _T_CARE_ANSWER:
        answer = ev.CareAnswer(p.answer) if p.answer in (1, 2, 3) else ev.CareAnswer.NO_INPUT
        return ev.CareCheckAnswer(ident, p.round_id, answer)
    if msg_type == _T_LOCATION:
        return ev.LocationReport(ident, _location(p))
    if msg_type == _T_LOGOUT:
        return ev.Logout(ident)
    if msg_type == _T_ACK:
        return ev.CommandAck(ident, p.ref_seq, True)
    if msg_type == _T_NACK:
        return ev.CommandAck(ident, p.ref_seq, False)
    return None


def nack(ref: FrameRef, reason: ev.Reject, seq: int = 0) -> bytes:
    """A NACK frame refusing the referenced frame."""
    return fmt.build_frame(
        MsgType.NACK,
        ref.ident,
        seq,
        {"ref_type": ref.msg_type, "ref_seq": ref.seq, "reason": int(reason)},
    )


def ack(ref: FrameRef, server_time: float, seq: int = 0) -> bytes:
    """An ACK frame confirming the referenced frame (hand-packed fast path)."""
    frame = _ACK.pack(
        _MAGIC,
        _VERSION,
        _ACK_LEN,
        _T_ACK,
        ref.ident.encode("ascii"),
        seq,
        ref.msg_type,
        ref.seq & 0xFFFFFFFF,
        int(server_time) & 0xFFFFFFFF,
    )
    return frame + crc_hqx(frame[2:], _CRC_INIT).to_bytes(2, "big")


def ident_of(raw_ident: bytes) -> str | None:
    """The ident in a header's 16-byte field, or None when it is unusable.

    Usable means: at least one printable ASCII character other than space (0x21-0x7E),
    then only NUL padding.
    """
    if _IDENT_OK.fullmatch(raw_ident) is None:
        return None
    return raw_ident.rstrip(b"\x00").decode("ascii")


def _bad_ident() -> DecodeError:
    # Without a usable ident there is nobody to answer: drop without a NACK.
    return DecodeError("malformed", detail="ident empty or not printable ASCII")


def decode_frame(frame: bytes) -> Inbound | DecodeError:
    """Decode one complete, CRC-checked frame into an event.

    Well-framed messages we cannot use get a NACK in ``DecodeError.reply`` so the
    terminal learns why instead of resending blindly.
    """
    length, msg_type, raw_ident, seq = _HEADER_FIELDS.unpack_from(frame)
    ident = ident_of(raw_ident)
    if ident is None:
        return _bad_ident()
    return _decode_body(frame, length, msg_type, ident, seq)


def _decode_body(
    frame: bytes, length: int, msg_type: int, ident: str, seq: int
) -> Inbound | DecodeError:
    """Everything of :func:`decode_frame` after the ident has been checked."""
    if msg_type == _T_HEARTBEAT and length == _HB_SHORT_LEN and len(frame) >= _HB_SHORT_END:
        status = frame[_HB_STATUS]
        if not status & _HAS_LOCATION:
            # Fast path for the most frequent frame; equal to parse_payload + _event, which
            # a test checks for every status byte. With the location bit set the construct
            # path below rejects the 3 bytes (the promised block is missing).
            battery = frame[_HB_BATTERY]
            signal = frame[_HB_SIGNAL]
            return Inbound(
                ev.Heartbeat(
                    ident,
                    None if battery == _UNKNOWN_U8 else battery if battery < 100 else 100,
                    bool(status & _CHARGING),
                    None if signal == _UNKNOWN_U8 else signal if signal < 100 else 100,
                    None,
                ),
                FrameRef(msg_type, seq, ident),
            )
    ref = FrameRef(msg_type, seq, ident)
    if msg_type not in _INBOUND_TYPES:
        return DecodeError(
            "unknown_type",
            detail=f"type 0x{msg_type:02x}",
            reply=nack(ref, ev.Reject.UNSUPPORTED_TYPE),
        )
    payload = frame[fmt.HEADER_SIZE : fmt.HEADER_SIZE + length]
    try:
        parsed = fmt.parse_payload(msg_type, payload)
    except Exception as exc:  # construct raises many types; all mean "bad payload"
        return DecodeError(
            "malformed",
            detail=f"type 0x{msg_type:02x}: {type(exc).__name__}",
            reply=nack(ref, ev.Reject.MALFORMED),
        )
    event = _event(msg_type, ident, seq, parsed)
    if event is None:
        return DecodeError("unknown_type", detail=f"type 0x{msg_type:02x}")
    return Inbound(event, ref)


def check_frame(buf: bytes | bytearray, max_payload: int) -> tuple[int, str | None]:
    """Validate the frame at the start of ``buf``.

    Returns ``(total_size, None)`` for a good frame, ``(0, None)`` when more bytes
    are needed, or ``(0, reason)`` for a frame that must be skipped.
    """
    if len(buf) < fmt.HEADER_SIZE:
        return 0, None
    if buf[2] != fmt.VERSION:
        return 0, "bad_version"
    length = (buf[3] << 8) | buf[4]
    if length > max_payload:
        return 0, "bad_length"
    total = fmt.OVERHEAD + length
    if len(buf) < total:
        return 0, None
    crc = (buf[total - 2] << 8) | buf[total - 1]
    if crc_hqx(memoryview(buf)[2 : total - 2], _CRC_INIT) != crc:
        return 0, "bad_crc"
    return total, None


def reply_frame(inbound: Inbound, outcome: Outcome) -> bytes | None:
    """ACK or NACK a frame; a terminal's own ACK/NACK of a command gets no reply."""
    ref = inbound.ctx
    assert isinstance(ref, FrameRef)
    if ref.msg_type in _NO_REPLY_TYPES:
        return None
    if outcome.ok:
        return ack(ref, outcome.server_time)
    return nack(ref, outcome.reason or ev.Reject.TRY_LATER)


class NativeCodec:
    """Per-connection native protocol codec (implements ``StreamCodec``)."""

    # One instance per connection (~19,000 per process): no per-instance __dict__.
    __slots__ = (
        "_buf",
        "_max_payload",
        "_max_noise",
        "_max_noise_at_start",
        "_noise",
        "_seen_good",
        "_raw_ident",
        "_ident",
    )

    protocol = "native"

    def __init__(
        self,
        max_payload: int = fmt.MAX_PAYLOAD,
        max_noise: int = 4096,
        max_noise_at_start: int = 256,
    ) -> None:
        self._buf = bytearray()
        self._max_payload = max_payload
        self._max_noise = max_noise
        self._max_noise_at_start = max_noise_at_start
        self._noise = 0  # bytes discarded since the last good frame
        self._seen_good = False
        # The last usable ident field and its string: a terminal sends the same 16 bytes
        # in every frame, so it is checked and decoded once, not per frame.
        self._raw_ident = b""
        self._ident = ""

    def feed(self, data: bytes) -> list[Inbound | DecodeError]:
        """Consume TCP bytes; return decoded frames and errors in arrival order."""
        out: list[Inbound | DecodeError] = []
        if not self._buf and data.__class__ is bytes:
            # Fast path: nothing is left over and the read starts with whole good frames
            # (usually it is exactly one). Decode them straight from ``data`` instead of
            # copying through the reassembly buffer. At the first thing that is not a
            # whole good frame (noise, a bad or partial frame) the general loop below
            # takes the rest from there, in the state it would have reached itself.
            end = len(data)
            pos = 0
            max_payload = self._max_payload
            while end - pos >= _HEADER_SIZE and data.startswith(_MAGIC, pos):
                if data[pos + 2] != _VERSION:
                    break
                length = (data[pos + 3] << 8) | data[pos + 4]
                stop = pos + _OVERHEAD + length
                if length > max_payload or stop > end:
                    break
                if crc_hqx(data[pos + 2 : stop - 2], _CRC_INIT) != (
                    (data[stop - 2] << 8) | data[stop - 1]
                ):
                    break
                frame = data if pos == 0 and stop == end else data[pos:stop]
                pos = stop
                self._noise = 0
                self._seen_good = True
                out.append(self._decode(frame))
            if pos == end:
                return out
            if pos:
                data = data[pos:]
        self._buf += data
        buf = self._buf
        while buf:
            start = buf.find(fmt.MAGIC)
            if start != 0:
                # Keep a trailing first magic byte: the second may be in the next read.
                drop = len(buf) - (1 if buf[-1] == fmt.MAGIC[0] else 0) if start < 0 else start
                if drop:
                    del buf[:drop]
                    out.append(DecodeError("noise", detail=f"{drop} bytes"))
                    if self._discard(drop, out):
                        return out
                if start < 0:
                    break
            total, reason = check_frame(buf, self._max_payload)
            if reason is not None:
                del buf[:2]
                out.append(DecodeError(reason))
                if self._discard(2, out):
                    return out
                continue
            if not total:
                break
            frame = bytes(buf[:total])
            del buf[:total]
            self._noise = 0
            self._seen_good = True
            out.append(self._decode(frame))
        return out

    def _decode(self, frame: bytes) -> Inbound | DecodeError:
        """:func:`decode_frame` with this connection's ident cache."""
        length, msg_type, raw_ident, seq = _HEADER_FIELDS.unpack_from(frame)
        if raw_ident != self._raw_ident:
            ident = ident_of(raw_ident)
            if ident is None:  # never cached: every frame with these bytes is checked again
                return _bad_ident()
            self._raw_ident = raw_ident
            self._ident = ident
        return _decode_body(frame, length, msg_type, self._ident, seq)

    def _discard(self, count: int, out: list[Inbound | DecodeError]) -> bool:
        self._noise += count
        limit = self._max_noise if self._seen_good else self._max_noise_at_start
        if self._noise > limit:
            out.append(DecodeError("noise", fatal=True, detail=f"{self._noise} bytes, no frame"))
            self._buf.clear()
            return True
        return False

    # ACK or NACK the frame: reply_frame itself (once per frame, one Python call fewer
    # than a method that forwards to it).
    reply = staticmethod(reply_frame)

    def command(self, ident: str, command: ev.Command, seq: int) -> bytes | None:
        """Encode a care prompt or settings push."""
        return encode_command(ident, command, seq)


def encode_command(ident: str, command: ev.Command, seq: int) -> bytes:
    """Build the frame carrying a server -> terminal command."""
    if isinstance(command, ev.CarePrompt):
        return fmt.build_frame(
            MsgType.CARE_PROMPT,
            ident,
            seq,
            {
                "round_id": command.round_id,
                "pattern": command.pattern,
                "window_s": command.window_s,
            },
        )
    return fmt.build_frame(
        MsgType.SETTINGS,
        ident,
        seq,
        {
            "heartbeat_interval_s": command.heartbeat_interval_s,
            "numbers": list(command.contact_numbers),
        },
    )


def decode_datagram(data: bytes, max_payload: int = fmt.MAX_PAYLOAD) -> Inbound | DecodeError:
    """Decode one UDP datagram, which must hold exactly one frame."""
    if not data.startswith(fmt.MAGIC):
        return DecodeError("noise", detail=f"{len(data)} bytes")
    total, reason = check_frame(data, max_payload)
    if reason is not None:
        return DecodeError(reason)
    if total == 0 or total != len(data):
        return DecodeError("bad_length", detail=f"datagram {len(data)} bytes, frame {total}")
    return decode_frame(data)
