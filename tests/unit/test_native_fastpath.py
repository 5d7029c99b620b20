"""Hand-written fast paths equal what the construct declarations say.

The hand-packed ACK is byte for byte the declared one; the hand-decoded 3-byte heartbeat
and the compiled ident check accept, reject and decode exactly like the code they replace.
"""

from __future__ import annotations

import itertools
import random
import struct

import pytest

from dispatch import events as ev
from dispatch.protocol import native_format as fmt
from dispatch.protocol.base import DecodeError, Inbound
from dispatch.protocol.native import (
    _HEADER,
    _HEADER_FIELDS,
    FrameRef,
    NativeCodec,
    _event,
    ack,
    decode_frame,
    ident_of,
    nack,
)
from dispatch.protocol.native_format import MsgType


@pytest.mark.parametrize(
    ("ident", "msg_type", "seq", "server_time", "out_seq"),
    [
        ("860000000000001", MsgType.HEARTBEAT, 1, 1_800_000_000, 0),
        ("A", MsgType.SOS, 0xFFFFFFFF, 0, 7),
        ("0123456789ABCDEF", MsgType.LOGIN, 65_536, 1_700_000_123.9, 0xFFFFFFFF),
        ("term-01", MsgType.CARE_ANSWER, 42, 4_294_967_295, 1),
    ],
)
def test_fast_ack_matches_declared_format(ident, msg_type, seq, server_time, out_seq) -> None:
    """ack() builds exactly what build_frame() builds from the construct declaration."""
    declared = fmt.build_frame(
        MsgType.ACK,
        ident,
        out_seq,
        {"ref_type": msg_type, "ref_seq": seq, "server_time": int(server_time)},
    )
    assert ack(FrameRef(msg_type, seq, ident), server_time, out_seq) == declared


# --- heartbeat payload fast path --------------------------------------------------------


def _heartbeat_frame(payload: bytes, ident: bytes = b"860000000000001", seq: int = 5) -> bytes:
    """A well-framed heartbeat carrying exactly ``payload`` (good CRC)."""
    head = struct.pack(">BHB16sI", 1, len(payload), MsgType.HEARTBEAT, ident.ljust(16, b"\0"), seq)
    return fmt.MAGIC + head + payload + fmt.crc16(head + payload).to_bytes(2, "big")


def _declared(frame: bytes) -> Inbound | DecodeError:
    """What construct makes of a heartbeat frame: the code before the fast path."""
    ident = frame[6:22].rstrip(b"\0").decode("ascii")
    seq = int.from_bytes(frame[22:26], "big")
    ref = FrameRef(MsgType.HEARTBEAT, seq, ident)
    try:
        # The compiled form of the declaration, as decode_frame used it for every heartbeat
        # (test_native_codec pins it to the declared Struct).
        parsed = fmt.parse_payload(MsgType.HEARTBEAT, frame[fmt.HEADER_SIZE : -fmt.TRAILER_SIZE])
    except Exception as exc:  # noqa: BLE001 - any construct error is "malformed"
        return DecodeError(
            "malformed",
            detail=f"type 0x02: {type(exc).__name__}",
            reply=nack(ref, ev.Reject.MALFORMED),
        )
    event = _event(MsgType.HEARTBEAT, ident, seq, parsed)
    assert event is not None
    return Inbound(event, ref)


# Every status byte (the location bit must send the frame to construct, which rejects the
# missing block) with the battery/signal values around every boundary _percent has.
_EDGES = (0, 1, 50, 99, 100, 101, 200, 254, 255)


@pytest.mark.parametrize("status", range(256))
def test_fast_heartbeat_matches_declared_format(status: int) -> None:
    """3-byte heartbeats decode exactly as parse_payload + _event decode them, or fail alike."""
    for battery, signal in itertools.product(_EDGES, _EDGES):
        frame = _heartbeat_frame(bytes((battery, status, signal)))
        expected = _declared(frame)
        assert NativeCodec().feed(frame) == [expected]
        assert decode_frame(frame) == expected  # the UDP path


def test_fast_heartbeat_matches_declared_format_on_random_payloads() -> None:
    """Random 3-byte payloads: the codec's result equals the construct path's."""
    rng = random.Random(808)
    codec = NativeCodec()
    for seq in range(3000):
        frame = _heartbeat_frame(rng.randbytes(3), seq=seq)
        assert codec.feed(frame) == [_declared(frame)]


def test_fast_heartbeat_reads_as_construct_parses() -> None:
    """Spot check of the fields themselves, not only agreement."""
    (got,) = NativeCodec().feed(_heartbeat_frame(bytes((101, 0x01, 0xFF))))
    assert got == Inbound(
        ev.Heartbeat("860000000000001", 100, True, None, None),
        FrameRef(MsgType.HEARTBEAT, 5, "860000000000001"),
    )
    (bad,) = NativeCodec().feed(_heartbeat_frame(bytes((80, 0x02, 70))))
    assert isinstance(bad, DecodeError) and bad.reason == "malformed" and bad.reply


@pytest.mark.parametrize("payload", [b"", b"\x50", b"\x50\x00", b"\x50\x00\x46\x00"])
def test_heartbeats_of_other_lengths_still_go_through_construct(payload: bytes) -> None:
    """Only the exact 3-byte payload is hand-decoded; shorter fails, longer is parsed."""
    frame = _heartbeat_frame(payload)
    assert NativeCodec().feed(frame) == [_declared(frame)]


# --- header and ident --------------------------------------------------------------------


def test_header_fields_match_full_header() -> None:
    """_HEADER_FIELDS reads what _HEADER reads, without magic and version."""
    rng = random.Random(26)
    for _ in range(500):
        data = fmt.MAGIC + rng.randbytes(24)
        assert _HEADER_FIELDS.unpack_from(data) == _HEADER.unpack_from(data)[2:]


def _old_ident(raw: bytes) -> str | None:
    """The per-byte check decode_frame used before the compiled pattern."""
    ident_bytes = raw.rstrip(b"\x00")
    if not ident_bytes or not all(0x21 <= b <= 0x7E for b in ident_bytes):
        return None
    return ident_bytes.decode("ascii")


def test_ident_of_agrees_with_per_byte_check() -> None:
    """ident_of accepts and decodes exactly what the old generator check did."""
    rng = random.Random(16)
    alphabet = [0x00, 0x00, 0x00, 0x20, 0x21, 0x41, 0x7E, 0x7F, 0x80, 0xE9, 0xFF, 0x0A]
    cases = [
        b"\x00" * 16,
        b"A" + b"\x00" * 15,
        b"\x00" + b"A" * 15,
        b"AB\x00CD".ljust(16, b"\x00"),
        b"a b~!".ljust(16, b"\x00"),
        b"ABCDEFGHIJKLMNOP",
        b"ABCDEFGHIJKLMNO\n",
        b"860000000000001\x00",
    ]
    for _ in range(20_000):
        n = rng.randrange(17)
        body = bytes(
            rng.choice(alphabet) if rng.random() < 0.2 else rng.randrange(0x21, 0x7F)
            for _ in range(n)
        )
        cases.append(body.ljust(16, b"\x00"))
        cases.append(rng.randbytes(16))
    accepted = 0
    for raw in cases:
        assert ident_of(raw) == _old_ident(raw), raw
        accepted += ident_of(raw) is not None
    assert 0 < accepted < len(cases)  # both outcomes were exercised


def test_cached_ident_then_other_invalid_ident_is_still_rejected() -> None:
    """After a good frame has filled the ident cache, a bad ident is still malformed."""
    codec = NativeCodec()
    good = _heartbeat_frame(b"\x50\x00\x46")
    bad = _heartbeat_frame(b"\x50\x00\x46", ident=b"86000000000\xe90001")
    spaced = _heartbeat_frame(b"\x50\x00\x46", ident=b"8600 0000000001")
    other = _heartbeat_frame(b"\x50\x00\x46", ident=b"860000000000002")
    (first,) = codec.feed(good)
    assert isinstance(first, Inbound) and first.event.ident == "860000000000001"
    for frame in (bad, spaced, bad):
        (err,) = codec.feed(frame)
        assert err == DecodeError("malformed", detail="ident empty or not printable ASCII")
    (again,) = codec.feed(good + other + good)[:1]
    assert isinstance(again, Inbound) and again.event.ident == "860000000000001"
    results = codec.feed(other + bad + good)
    assert [r.event.ident if isinstance(r, Inbound) else r.reason for r in results] == [
        "860000000000002",
        "malformed",
        "860000000000001",
    ]
