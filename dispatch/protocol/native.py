"""Native protocol codec: stream reassembly, frame checks, events and replies.

Resynchronisation (documented in docs/protocol.md): bytes before a magic are
noise; a frame whose version, length or CRC is wrong is dropped by skipping
its magic and searching again.  A stream that yields only noise for
``max_noise`` bytes (``max_noise_at_start`` before its first good frame)
is reported fatal so the connection is dropped.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from dispatch import events as ev
from dispatch.protocol import native_format as fmt
from dispatch.protocol.base import DecodeError, Inbound, Outcome
from dispatch.protocol.native_format import MsgType

# Hand-checked fast path for the header; tests pin it to the construct declaration.
_HEADER = struct.Struct(">2sBHB16sI")
# ACK is the most frequent frame we build (one per heartbeat); construct's build costs
# ~40 us, this ~2 us. Tests pin it byte for byte to the construct declaration.
_ACK = struct.Struct(">2sBHB16sIBII")
_ACK_LEN = 9


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
    if msg_type == MsgType.HEARTBEAT:
        return ev.Heartbeat(
            ident,
            _percent(p.battery),
            fmt.is_charging(p.status),
            _percent(p.signal),
            _location(p.location),
        )
    if msg_type == MsgType.SOS:
        trigger = ev.SosTrigger(p.trigger) if p.trigger in (1, 2, 3) else ev.SosTrigger.OTHER
        return ev.Sos(
            ident,
            seq,
            trigger,
            _location(p.location),
            float(p.terminal_time) if p.terminal_time else None,
            _percent(p.battery),
        )
    if msg_type == MsgType.LOGIN:
        return ev.Login(ident, p.firmware, p.protocol_version)
    if msg_type == MsgType.CARE_ANSWER:
        answer = ev.CareAnswer(p.answer) if p.answer in (1, 2, 3) else ev.CareAnswer.NO_INPUT
        return ev.CareCheckAnswer(ident, p.round_id, answer)
    if msg_type == MsgType.LOCATION:
        return ev.LocationReport(ident, _location(p))
    if msg_type == MsgType.LOGOUT:
        return ev.Logout(ident)
    if msg_type == MsgType.ACK:
        return ev.CommandAck(ident, p.ref_seq, True)
    if msg_type == MsgType.NACK:
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
        fmt.MAGIC,
        fmt.VERSION,
        _ACK_LEN,
        MsgType.ACK,
        ref.ident.encode("ascii"),
        seq,
        ref.msg_type,
        ref.seq & 0xFFFFFFFF,
        int(server_time) & 0xFFFFFFFF,
    )
    return frame + fmt.crc16(frame[2:]).to_bytes(2, "big")


def decode_frame(frame: bytes) -> Inbound | DecodeError:
    """Decode one complete, CRC-checked frame into an event.

    Well-framed messages we cannot use get a NACK in ``DecodeError.reply`` so the
    terminal learns why instead of resending blindly.
    """
    _magic, _ver, length, msg_type, raw_ident, seq = _HEADER.unpack_from(frame)
    ident_bytes = raw_ident.rstrip(b"\x00")
    if not ident_bytes or not all(0x21 <= b <= 0x7E for b in ident_bytes):
        # Without a usable ident there is nobody to answer: drop without a NACK.
        return DecodeError("malformed", detail="ident empty or not printable ASCII")
    ident = ident_bytes.decode("ascii")
    ref = FrameRef(msg_type, seq, ident)
    if msg_type not in fmt.PAYLOADS_C or msg_type in (MsgType.CARE_PROMPT, MsgType.SETTINGS):
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
    if fmt.crc16(memoryview(buf)[2 : total - 2]) != crc:
        return 0, "bad_crc"
    return total, None


class NativeCodec:
    """Per-connection native protocol codec (implements ``StreamCodec``)."""

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

    def feed(self, data: bytes) -> list[Inbound | DecodeError]:
        """Consume TCP bytes; return decoded frames and errors in arrival order."""
        self._buf += data
        out: list[Inbound | DecodeError] = []
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
            out.append(decode_frame(frame))
        return out

    def _discard(self, count: int, out: list[Inbound | DecodeError]) -> bool:
        self._noise += count
        limit = self._max_noise if self._seen_good else self._max_noise_at_start
        if self._noise > limit:
            out.append(DecodeError("noise", fatal=True, detail=f"{self._noise} bytes, no frame"))
            self._buf.clear()
            return True
        return False

    def reply(self, inbound: Inbound, outcome: Outcome) -> bytes | None:
        """ACK or NACK the frame (see :func:`reply_frame`)."""
        return reply_frame(inbound, outcome)

    def command(self, ident: str, command: ev.Command, seq: int) -> bytes | None:
        """Encode a care prompt or settings push."""
        return encode_command(ident, command, seq)


def reply_frame(inbound: Inbound, outcome: Outcome) -> bytes | None:
    """ACK or NACK a frame; a terminal's own ACK/NACK of a command gets no reply."""
    ref = inbound.ctx
    assert isinstance(ref, FrameRef)
    if ref.msg_type in (MsgType.ACK, MsgType.NACK):
        return None
    if outcome.ok:
        return ack(ref, outcome.server_time)
    return nack(ref, outcome.reason or ev.Reject.TRY_LATER)


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
