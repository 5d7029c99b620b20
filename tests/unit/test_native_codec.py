"""Native protocol codec: round trips, header fast path, stream reassembly and resync."""

from __future__ import annotations

import random
import struct

import pytest

from dispatch import events as ev
from dispatch.protocol import native_format as fmt
from dispatch.protocol.base import DecodeError, Inbound, Outcome
from dispatch.protocol.native import (
    _HEADER,
    FrameRef,
    NativeCodec,
    decode_datagram,
)
from dispatch.protocol.native_format import MsgType
from simulators.native_codec import NativeTerminalCodec

IDENT = "860000000000001"
BERLIN = ev.Location(52.520008, 13.404954, 12)
SOUTH_WEST = ev.Location(-34.603722, -58.381592, None)


def raw_frame(
    msg_type: int,
    payload: bytes = b"",
    *,
    ident: bytes = IDENT.encode(),
    seq: int = 1,
    version: int = 1,
    length: int | None = None,
    crc: int | None = None,
) -> bytes:
    """A frame assembled by hand, so tests can break any field."""
    length = len(payload) if length is None else length
    head = struct.pack(">BHB16sI", version, length, msg_type, ident.ljust(16, b"\x00"), seq)
    body = head + payload
    crc = fmt.crc16(body) if crc is None else crc
    return fmt.MAGIC + body + crc.to_bytes(2, "big")


def frame_of(built: bytes | tuple[bytes, object]) -> bytes:
    """The frame from a simulator builder, whether it returns bytes or (bytes, ack key)."""
    return built if isinstance(built, bytes) else built[0]


def inbound(results: list[Inbound | DecodeError]) -> list[Inbound]:
    return [r for r in results if isinstance(r, Inbound)]


def errors(results: list[Inbound | DecodeError]) -> list[DecodeError]:
    return [r for r in results if isinstance(r, DecodeError)]


def feed_one(frame: bytes) -> Inbound:
    results = NativeCodec().feed(frame)
    assert len(results) == 1 and isinstance(results[0], Inbound), results
    return results[0]


def parse_nack(frame: bytes) -> tuple[int, int, int]:
    """(ref_type, ref_seq, reason) of a NACK frame."""
    header = fmt.Header.parse(frame)
    assert header.type == MsgType.NACK
    body = fmt.Nack.parse(frame[fmt.HEADER_SIZE : -fmt.TRAILER_SIZE])
    return body.ref_type, body.ref_seq, body.reason


# --- terminal -> server round trips ------------------------------------------------


def test_login_round_trip() -> None:
    """LOGIN carries firmware and protocol version; ctx records type and seq."""
    term = NativeTerminalCodec(IDENT, firmware="2.0.1-rc3")
    frame = frame_of(term.login())
    got = feed_one(frame)
    assert got.event == ev.Login(IDENT, "2.0.1-rc3", 1, None)
    assert got.ctx == FrameRef(MsgType.LOGIN, 1, IDENT)


def test_heartbeat_round_trip_without_location() -> None:
    """HEARTBEAT battery, charging and signal survive; no location bit gives location None."""
    term = NativeTerminalCodec(IDENT)
    frame = frame_of(term.heartbeat(80, True, 70))
    assert len(frame) == fmt.OVERHEAD + 3
    got = feed_one(frame)
    assert got.event == ev.Heartbeat(IDENT, 80, True, 70, None)
    assert got.event.location is None
    assert got.ctx == FrameRef(MsgType.HEARTBEAT, 1, IDENT)


def test_heartbeat_round_trip_with_location() -> None:
    """HEARTBEAT with a location block decodes lat/lon (1e-6 degrees) and accuracy."""
    frame = frame_of(NativeTerminalCodec(IDENT).heartbeat(5, False, 0, BERLIN))
    assert len(frame) == fmt.OVERHEAD + 13
    event = feed_one(frame).event
    assert event == ev.Heartbeat(IDENT, 5, False, 0, BERLIN)
    assert event.location is not None and event.location.source == "gps"


def test_heartbeat_unknown_battery_and_signal_are_none() -> None:
    """0xFF battery and signal decode to None, not 255."""
    frame = frame_of(NativeTerminalCodec(IDENT).heartbeat(0xFF, False, 0xFF))
    event = feed_one(frame).event
    assert isinstance(event, ev.Heartbeat)
    assert event.battery is None and event.signal is None


def test_heartbeat_percent_above_100_reads_as_100() -> None:
    """Battery/signal values 101-254 are clamped to 100."""
    payload = {"battery": 101, "status": 0, "signal": 254, "location": None}
    frame = fmt.build_frame(MsgType.HEARTBEAT, IDENT, 9, payload)
    assert feed_one(frame).event == ev.Heartbeat(IDENT, 100, False, 100, None)


@pytest.mark.parametrize("trigger", list(ev.SosTrigger))
def test_sos_round_trip_with_location(trigger: ev.SosTrigger) -> None:
    """SOS carries seq, trigger, location, terminal time and battery for every trigger."""
    term = NativeTerminalCodec(IDENT)
    term.login()
    frame = frame_of(term.sos(trigger, BERLIN, 1700000000.9, 64))
    assert len(frame) == fmt.OVERHEAD + 17
    got = feed_one(frame)
    assert got.event == ev.Sos(IDENT, 2, trigger, BERLIN, 1700000000.0, 64)
    assert got.ctx == FrameRef(MsgType.SOS, 2, IDENT)


def test_sos_without_location_unknown_time_and_battery() -> None:
    """SOS without location bit: location None; terminal_time 0 and battery 0xFF become None."""
    frame = frame_of(NativeTerminalCodec(IDENT).sos(ev.SosTrigger.FALL, None, 0, 0xFF))
    assert len(frame) == fmt.OVERHEAD + 7
    assert feed_one(frame).event == ev.Sos(IDENT, 1, ev.SosTrigger.FALL, None, None, None)


def test_sos_location_with_unknown_accuracy() -> None:
    """Negative coordinates round-trip and accuracy 0xFFFF decodes to None."""
    frame = frame_of(NativeTerminalCodec(IDENT).sos(ev.SosTrigger.BUTTON, SOUTH_WEST, 1, 0))
    event = feed_one(frame).event
    assert isinstance(event, ev.Sos)
    assert event.location == SOUTH_WEST and event.terminal_time == 1.0 and event.battery == 0


def test_sos_unknown_trigger_reads_as_other() -> None:
    """An SOS trigger value outside 1-3 is decoded as OTHER rather than rejected."""
    payload = {"trigger": 9, "status": 0, "battery": 50, "terminal_time": 5, "location": None}
    frame = fmt.build_frame(MsgType.SOS, IDENT, 3, payload)
    assert feed_one(frame).event == ev.Sos(IDENT, 3, ev.SosTrigger.OTHER, None, 5.0, 50)


@pytest.mark.parametrize("answer", list(ev.CareAnswer))
def test_care_answer_round_trip(answer: ev.CareAnswer) -> None:
    """CARE_ANSWER carries round id and every answer value."""
    frame = frame_of(NativeTerminalCodec(IDENT).care_answer(0xDEADBEEF, answer))
    got = feed_one(frame)
    assert got.event == ev.CareCheckAnswer(IDENT, 0xDEADBEEF, answer)
    assert got.ctx == FrameRef(MsgType.CARE_ANSWER, 1, IDENT)


def test_care_answer_unknown_value_reads_as_no_input() -> None:
    """A care answer outside 1-3 is decoded as NO_INPUT."""
    frame = fmt.build_frame(MsgType.CARE_ANSWER, IDENT, 4, {"round_id": 7, "answer": 0})
    assert feed_one(frame).event == ev.CareCheckAnswer(IDENT, 7, ev.CareAnswer.NO_INPUT)


def test_location_report_round_trip() -> None:
    """LOCATION (built with build_frame: the simulator has no builder) decodes to a report."""
    payload = {"lat_e6": -34603722, "lon_e6": -58381592, "accuracy_m": fmt.UNKNOWN_ACCURACY}
    frame = fmt.build_frame(MsgType.LOCATION, IDENT, 11, payload)
    got = feed_one(frame)
    assert got.event == ev.LocationReport(IDENT, SOUTH_WEST)
    assert got.ctx == FrameRef(MsgType.LOCATION, 11, IDENT)


def test_logout_round_trip() -> None:
    """LOGOUT has an empty payload and decodes to Logout."""
    frame = fmt.build_frame(MsgType.LOGOUT, IDENT, 12, {})
    assert len(frame) == fmt.OVERHEAD
    got = feed_one(frame)
    assert got.event == ev.Logout(IDENT)
    assert got.ctx == FrameRef(MsgType.LOGOUT, 12, IDENT)


def test_terminal_ack_is_command_ack_and_gets_no_reply() -> None:
    """A terminal's ACK of a command decodes to CommandAck(ok) and is not itself answered."""
    term = NativeTerminalCodec(IDENT)
    codec = NativeCodec()
    (got,) = codec.feed(frame_of(term.command_ack(MsgType.CARE_PROMPT, 77)))
    assert isinstance(got, Inbound)
    assert got.event == ev.CommandAck(IDENT, 77, True)
    assert got.ctx == FrameRef(MsgType.ACK, 1, IDENT)
    assert codec.reply(got, Outcome.accept(5.0)) is None


def test_terminal_nack_is_refused_command_and_gets_no_reply() -> None:
    """A terminal's NACK of a command decodes to CommandAck(ok=False), not answered."""
    payload = {"ref_type": MsgType.SETTINGS, "ref_seq": 78, "reason": 4}
    codec = NativeCodec()
    (got,) = codec.feed(fmt.build_frame(MsgType.NACK, IDENT, 2, payload))
    assert isinstance(got, Inbound)
    assert got.event == ev.CommandAck(IDENT, 78, False)
    assert codec.reply(got, Outcome.reject(ev.Reject.MALFORMED)) is None


def test_terminal_seq_counts_every_frame() -> None:
    """The simulator numbers its frames 1, 2, 3 ... across message types."""
    term = NativeTerminalCodec(IDENT)
    frames = [
        frame_of(term.login()),
        frame_of(term.heartbeat(1, False, 1)),
        frame_of(term.command_ack(MsgType.SETTINGS, 1)),
        frame_of(term.sos(ev.SosTrigger.BUTTON, None, 0, 1)),
    ]
    seqs = [r.ctx.seq for r in NativeCodec().feed(b"".join(frames))]
    assert seqs == [1, 2, 3, 4]


def test_ident_of_sixteen_chars_has_no_padding() -> None:
    """A 16-character ident fills the field exactly and decodes unchanged."""
    ident = "ABCDEFGHIJKLMNOP"
    frame = frame_of(NativeTerminalCodec(ident).heartbeat(1, False, 1))
    assert frame[6:22] == ident.encode()
    assert feed_one(frame).event.ident == ident


# --- server -> terminal ------------------------------------------------------------


def _sos_inbound(seq_before: int = 0) -> tuple[NativeCodec, Inbound, NativeTerminalCodec]:
    term = NativeTerminalCodec(IDENT)
    for _ in range(seq_before):
        term.heartbeat(1, False, 1)
    codec = NativeCodec()
    frame = frame_of(term.sos(ev.SosTrigger.BUTTON, BERLIN, 1700000000, 90))
    (got,) = codec.feed(frame)
    assert isinstance(got, Inbound)
    return codec, got, term


def test_reply_ack_parses_in_terminal() -> None:
    """reply(accept) is an ACK with ref type/seq and whole-second server time, header seq 0."""
    codec, got, term = _sos_inbound(seq_before=4)
    data = codec.reply(got, Outcome.accept(1700000123.9))
    assert data is not None
    assert term.feed(data) == [
        {"type": "ack", "seq": 0, "key": ("sos", 5), "server_time": 1700000123}
    ]
    assert fmt.Header.parse(data).ident == IDENT


@pytest.mark.parametrize("reason", list(ev.Reject))
def test_reply_nack_parses_in_terminal(reason: ev.Reject) -> None:
    """reply(reject) is a NACK carrying ref type/seq and each reason code."""
    codec, got, term = _sos_inbound()
    data = codec.reply(got, Outcome.reject(reason))
    assert data is not None
    assert term.feed(data) == [
        {"type": "nack", "seq": 0, "key": ("sos", 1), "reason": reason.name.lower()}
    ]
    assert parse_nack(data) == (MsgType.SOS, 1, int(reason))


def test_reply_reject_without_reason_is_try_later() -> None:
    """A refusal without a reason is sent as NACK 5 (try later) so the terminal resends."""
    codec, got, _ = _sos_inbound()
    data = codec.reply(got, Outcome(False))
    assert data is not None
    assert parse_nack(data) == (MsgType.SOS, 1, ev.Reject.TRY_LATER)


def test_command_care_prompt_parses_in_terminal() -> None:
    """command(CarePrompt) parses back with round id, pattern, window and command seq."""
    data = NativeCodec().command(IDENT, ev.CarePrompt(4242, pattern=1, window_s=120), seq=17)
    assert data is not None
    assert NativeTerminalCodec(IDENT).feed(data) == [
        {"type": "care_prompt", "seq": 17, "round_id": 4242, "pattern": 1, "window_s": 120}
    ]


@pytest.mark.parametrize("numbers", [(), ("112",), ("+4930123456", "0049301234567", "112")])
def test_command_settings_parses_in_terminal(numbers: tuple[str, ...]) -> None:
    """command(Settings) parses back with heartbeat interval and the numbers in order."""
    data = NativeCodec().command(IDENT, ev.Settings(60, numbers), seq=0xFFFFFFFF)
    assert data is not None
    assert NativeTerminalCodec(IDENT).feed(data) == [
        {"type": "settings", "seq": 0xFFFFFFFF, "heartbeat_interval_s": 60, "numbers": [*numbers]}
    ]


def test_server_frames_fed_together_split_in_terminal() -> None:
    """Several server frames in one read, and split mid-frame, all reach the terminal."""
    codec, got, _ = _sos_inbound()
    stream = codec.reply(got, Outcome.accept(1.0)) + codec.command(
        IDENT, ev.Settings(30, ("112",)), 3
    )
    term = NativeTerminalCodec(IDENT)
    out = term.feed(stream[:40]) + term.feed(stream[40:])
    assert [m["type"] for m in out] == ["ack", "settings"]


def test_terminal_keeps_trailing_magic_byte() -> None:
    """A server frame split right after its first byte (D5) still decodes in the simulator."""
    codec, got, _ = _sos_inbound()
    data = codec.reply(got, Outcome.accept(1.0))
    term = NativeTerminalCodec(IDENT)
    assert term.feed(data[:1]) + term.feed(data[1:]) != []


# --- compiled payload parsers ------------------------------------------------------

_VALID_PAYLOADS = {
    MsgType.LOGIN: {"protocol_version": 1, "firmware": "1.4.2"},
    MsgType.HEARTBEAT: {
        "battery": 1,
        "status": 2,
        "signal": 3,
        "location": {"lat_e6": -1, "lon_e6": 2, "accuracy_m": 3},
    },
    MsgType.SOS: {
        "trigger": 1,
        "status": 2,
        "battery": 3,
        "terminal_time": 4,
        "location": {"lat_e6": -1, "lon_e6": 2, "accuracy_m": 3},
    },
    MsgType.CARE_ANSWER: {"round_id": 1, "answer": 2},
    MsgType.LOCATION: {"lat_e6": -1, "lon_e6": 2, "accuracy_m": 3},
    MsgType.LOGOUT: {},
    MsgType.ACK: {"ref_type": 1, "ref_seq": 2, "server_time": 3},
    MsgType.NACK: {"ref_type": 1, "ref_seq": 2, "reason": 3},
    MsgType.CARE_PROMPT: {"round_id": 1, "pattern": 2, "window_s": 3},
    MsgType.SETTINGS: {"heartbeat_interval_s": 60, "numbers": ["112", "+4930123456"]},
}


@pytest.mark.parametrize(
    "msg_type",
    list(MsgType),
    ids=[t.name for t in MsgType],
)
def test_compiled_parser_rejects_every_truncation_like_declaration(msg_type: MsgType) -> None:
    """PAYLOADS_C raises on every truncated payload exactly where the declared Struct does."""
    full = fmt.PAYLOADS[msg_type].build(_VALID_PAYLOADS[msg_type])
    assert fmt.parse_payload(msg_type, full) == fmt.PAYLOADS[msg_type].parse(full)
    for cut in range(len(full)):
        with pytest.raises(Exception):  # noqa: B017 - construct raises several types
            fmt.PAYLOADS[msg_type].parse(full[:cut])
        with pytest.raises(Exception):  # noqa: B017
            fmt.parse_payload(msg_type, full[:cut])


# --- header fast path --------------------------------------------------------------


@pytest.mark.parametrize("ident", ["1", IDENT, "ABCDEFGHIJKLMNOP", "a b~!", "AB\x00CD"])
@pytest.mark.parametrize("seq", [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF])
def test_fast_header_agrees_with_construct(ident: str, seq: int) -> None:
    """native._HEADER unpacks the same fields as the construct Header declaration."""
    data = fmt.Header.build(
        {"version": 1, "length": 300, "type": MsgType.SOS, "ident": ident, "seq": seq}
    )
    magic, version, length, msg_type, raw_ident, fast_seq = _HEADER.unpack(data)
    for parsed in (fmt.Header.parse(data), fmt.HEADER_C.parse(data)):
        assert (magic, version, length, msg_type, fast_seq) == (
            parsed.magic,
            parsed.version,
            parsed.length,
            parsed.type,
            parsed.seq,
        )
        assert raw_ident.rstrip(b"\x00").decode("ascii") == parsed.ident == ident


def test_fast_header_agrees_with_construct_on_random_headers() -> None:
    """_HEADER and Header agree on 500 random headers (any version/length/type, ASCII ident)."""
    rng = random.Random(7)
    for _ in range(500):
        ident = bytes(rng.randrange(0, 0x80) for _ in range(16))
        data = fmt.MAGIC + bytes([rng.randrange(256)]) + rng.randbytes(3) + ident + rng.randbytes(4)
        fast = _HEADER.unpack(data)
        parsed = fmt.HEADER_C.parse(data)
        assert fast[:4] == (parsed.magic, parsed.version, parsed.length, parsed.type)
        assert fast[5] == parsed.seq
        assert fast[4].rstrip(b"\x00").decode("ascii") == parsed.ident


def test_header_sizes_agree() -> None:
    """The fast struct, the construct Header and HEADER_SIZE are all 26 bytes."""
    assert _HEADER.size == fmt.Header.sizeof() == fmt.HEADER_SIZE == 26


# --- stream reassembly -------------------------------------------------------------


def _five_frames() -> list[bytes]:
    term = NativeTerminalCodec(IDENT)
    return [
        frame_of(term.login()),
        frame_of(term.heartbeat(77, True, 40, BERLIN)),
        frame_of(term.sos(ev.SosTrigger.FALL, SOUTH_WEST, 1700000000, 12)),
        frame_of(term.care_answer(3, ev.CareAnswer.HELP)),
        fmt.build_frame(MsgType.LOGOUT, IDENT, 5, {}),
    ]


STREAM = b"".join(_five_frames())
WHOLE = NativeCodec().feed(STREAM)


def test_whole_stream_decodes_five_events() -> None:
    """Five back-to-back frames in one read give five events in order, no errors."""
    assert [type(r.event) for r in WHOLE] == [
        ev.Login,
        ev.Heartbeat,
        ev.Sos,
        ev.CareCheckAnswer,
        ev.Logout,
    ]
    assert all(isinstance(r, Inbound) for r in WHOLE)


def test_stream_split_at_every_position() -> None:
    """Splitting the stream into two reads at any byte gives the same events."""
    for cut in range(1, len(STREAM)):
        codec = NativeCodec()
        results = codec.feed(STREAM[:cut]) + codec.feed(STREAM[cut:])
        assert results == WHOLE, cut


def test_stream_one_byte_at_a_time() -> None:
    """Feeding one byte per read gives the same events and nothing else."""
    codec = NativeCodec()
    results = []
    for i in range(len(STREAM)):
        results += codec.feed(STREAM[i : i + 1])
    assert results == WHOLE


def test_noise_before_and_between_frames() -> None:
    """Garbage before and between frames is reported as noise; the frames still decode."""
    f = _five_frames()
    stream = b"hello" + f[0] + b"\x00\xd5\x01\x7e\xd5" + f[1] + b"\xff" * 3 + f[2]
    results = NativeCodec().feed(stream)
    assert [r.reason if isinstance(r, DecodeError) else "ok" for r in results] == [
        "noise",
        "ok",
        "noise",
        "ok",
        "noise",
        "ok",
    ]
    assert [e.detail for e in errors(results)] == ["5 bytes", "5 bytes", "3 bytes"]
    assert not any(e.fatal for e in errors(results))
    assert inbound(results) == WHOLE[:3]


def test_bad_crc_is_skipped_and_next_frame_decodes() -> None:
    """A frame with a flipped CRC byte is reported bad_crc and the following frame decodes."""
    f = _five_frames()
    broken = f[1][:-1] + bytes([f[1][-1] ^ 0x01])
    results = NativeCodec().feed(f[0] + broken + f[2])
    assert [e.reason for e in errors(results)] == ["bad_crc", "noise"]
    assert errors(results)[1].detail == f"{len(broken) - 2} bytes"
    assert inbound(results) == [WHOLE[0], WHOLE[2]]


def test_bad_crc_frame_split_across_reads() -> None:
    """bad_crc is detected only once the whole frame is in, and the next frame still decodes."""
    f = _five_frames()
    broken = f[3][:-2] + b"\x00\x00"
    codec = NativeCodec()
    assert codec.feed(broken[:-1]) == []
    results = codec.feed(broken[-1:] + f[4])
    assert [e.reason for e in errors(results)] == ["bad_crc", "noise"]
    assert inbound(results) == [WHOLE[4]]


def test_length_over_512_is_bad_length_and_resyncs() -> None:
    """A length field above 512 is rejected from the header alone and the stream resyncs."""
    f = _five_frames()
    too_long = raw_frame(MsgType.HEARTBEAT, b"\x01\x00\x01", length=513)
    codec = NativeCodec()
    results = codec.feed(too_long[: fmt.HEADER_SIZE])
    assert [e.reason for e in results] == ["bad_length", "noise"]
    results = codec.feed(too_long[fmt.HEADER_SIZE :] + f[0])
    assert inbound(results) == [WHOLE[0]]


def test_length_512_is_accepted() -> None:
    """A length of exactly 512 is within the limit (trailing payload bytes are ignored)."""
    frame = raw_frame(MsgType.HEARTBEAT, b"\x01\x00\x01" + bytes(509), length=512)
    assert feed_one(frame).event == ev.Heartbeat(IDENT, 1, False, 1, None)


def test_wrong_version_is_bad_version_and_resyncs() -> None:
    """A frame whose version is not 1 is dropped as bad_version; the next frame decodes."""
    f = _five_frames()
    results = NativeCodec().feed(raw_frame(MsgType.LOGOUT, version=2) + f[0])
    assert [e.reason for e in errors(results)] == ["bad_version", "noise"]
    assert all(e.reply is None for e in errors(results))
    assert inbound(results) == [WHOLE[0]]


@pytest.mark.parametrize(
    "msg_type", [0x00, 0x07, 0x7F, 0xFF, MsgType.CARE_PROMPT, MsgType.SETTINGS]
)
def test_unknown_type_gets_nack_3(msg_type: int) -> None:
    """A good-CRC frame of a type the server does not take is unknown_type with NACK reason 3."""
    f = _five_frames()
    results = NativeCodec().feed(raw_frame(msg_type, b"\x00" * 7, seq=42) + f[0])
    err = results[0]
    assert isinstance(err, DecodeError) and err.reason == "unknown_type" and not err.fatal
    assert err.reply is not None
    assert parse_nack(err.reply) == (msg_type, 42, ev.Reject.UNSUPPORTED_TYPE)
    assert fmt.Header.parse(err.reply).ident == IDENT
    assert results[1:] == [WHOLE[0]]


@pytest.mark.parametrize(
    ("msg_type", "payload"),
    [
        (MsgType.SOS, b"\x01\x00\x40"),
        (MsgType.HEARTBEAT, b"\x50\x02\x40"),
        (MsgType.LOGIN, b"\x01"),
        (MsgType.LOGIN, b"\x01\x01\xff"),
        (MsgType.CARE_ANSWER, b""),
        (MsgType.LOCATION, bytes(9)),
        (MsgType.ACK, b"\x82"),
        (MsgType.LOGIN, b"\x01\x05ab"),
    ],
    ids=[
        "sos-3-bytes",
        "hb-loc-bit-no-block",
        "login-no-firmware-length",
        "login-non-ascii",
        "care-empty",
        "location-9-bytes",
        "ack-1-byte",
        "login-firmware-cut-short",
    ],
)
def test_truncated_payload_is_malformed_with_nack_4(msg_type: int, payload: bytes) -> None:
    """A good-CRC frame whose payload is too short or invalid for its type gets NACK 4."""
    f = _five_frames()
    results = NativeCodec().feed(raw_frame(msg_type, payload, seq=9) + f[0])
    err = results[0]
    assert isinstance(err, DecodeError) and err.reason == "malformed" and not err.fatal
    assert err.reply is not None
    assert parse_nack(err.reply) == (msg_type, 9, ev.Reject.MALFORMED)
    assert results[1:] == [WHOLE[0]]


def test_non_ascii_ident_is_malformed_without_reply() -> None:
    """A frame whose ident bytes are not ASCII is malformed and gets no reply."""
    frame = raw_frame(MsgType.LOGOUT, ident=b"86000000000\xe90001")
    results = NativeCodec().feed(frame + _five_frames()[0])
    err = results[0]
    assert isinstance(err, DecodeError) and err.reason == "malformed"
    assert err.reply is None and not err.fatal
    assert results[1:] == [WHOLE[0]]
    dgram = decode_datagram(frame)
    assert isinstance(dgram, DecodeError) and dgram.reason == "malformed" and dgram.reply is None


def test_300_bytes_of_garbage_at_start_is_fatal() -> None:
    """More than 256 noise bytes before the first good frame is fatal and clears the buffer."""
    codec = NativeCodec()
    results = codec.feed(b"\x00" * 300 + STREAM)
    assert results[-1] == DecodeError("noise", fatal=True, detail="300 bytes, no frame")
    assert inbound(results) == []
    assert codec._buf == bytearray()


def test_256_bytes_of_garbage_at_start_is_tolerated() -> None:
    """Exactly 256 noise bytes at the start are not fatal; 257 are."""
    results = NativeCodec().feed(b"x" * 256 + STREAM)
    assert not any(e.fatal for e in errors(results))
    assert inbound(results) == WHOLE
    results = NativeCodec().feed(b"x" * 257)
    assert results[-1].fatal


def test_garbage_at_start_counts_across_reads() -> None:
    """Noise is totalled across reads until a good frame: 200 + 100 bytes is fatal."""
    codec = NativeCodec()
    assert not any(e.fatal for e in codec.feed(b"x" * 200))
    assert codec.feed(b"x" * 100)[-1].fatal


def test_skipped_magics_count_as_noise() -> None:
    """Repeated bad frames count 2 bytes per skipped magic plus their bodies towards fatal."""
    bad = raw_frame(MsgType.LOGOUT, crc=0)
    results = NativeCodec().feed(bad * 10)  # 280 discarded bytes, no good frame
    assert results[-1].fatal
    assert [e.reason for e in errors(results)][:2] == ["bad_crc", "noise"]


def test_after_a_good_frame_limit_is_4096() -> None:
    """After a good frame, up to 4096 noise bytes are tolerated; more is fatal."""
    codec = NativeCodec()
    codec.feed(STREAM[: len(_five_frames()[0])])
    assert not any(e.fatal for e in codec.feed(b"x" * 4096))
    assert codec.feed(b"x")[-1].fatal


def test_good_frame_resets_noise_count() -> None:
    """Noise totals restart after every good frame."""
    f = _five_frames()
    codec = NativeCodec()
    results = codec.feed(b"x" * 200 + f[0] + b"x" * 4000 + f[1] + b"x" * 4000 + f[2])
    assert not any(e.fatal for e in errors(results))
    assert inbound(results) == WHOLE[:3]


def test_trailing_lone_magic_byte_is_kept() -> None:
    """A D5 at the end of a read is kept, not counted as noise, so a split magic still matches."""
    frame = _five_frames()[0]
    codec = NativeCodec()
    results = codec.feed(b"abc" + frame[:1])
    assert results == [DecodeError("noise", detail="3 bytes")]
    assert codec.feed(frame[1:]) == [WHOLE[0]]
    codec = NativeCodec()
    assert codec.feed(b"\xd5") == []
    assert codec.feed(frame[1:]) == [WHOLE[0]]


def test_lone_magic_byte_not_followed_by_7e_is_noise() -> None:
    """A kept D5 that turns out not to start a magic is discarded as noise with the next read."""
    codec = NativeCodec()
    assert codec.feed(b"\xd5") == []
    results = codec.feed(b"\x00" + _five_frames()[0])
    assert results == [DecodeError("noise", detail="2 bytes"), WHOLE[0]]


def test_partial_header_waits_for_more() -> None:
    """A magic followed by fewer than 26 header bytes is neither noise nor error yet."""
    codec = NativeCodec()
    assert codec.feed(STREAM[:25]) == []
    assert codec.feed(STREAM[25:]) == WHOLE


# --- datagrams ---------------------------------------------------------------------


def test_datagram_with_exactly_one_frame_decodes() -> None:
    """decode_datagram accepts a datagram that is exactly one good frame."""
    frame = _five_frames()[2]
    assert decode_datagram(frame) == WHOLE[2]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (STREAM[: len(_five_frames()[0])] + b"\x00", "bad_length"),
        (STREAM[: len(_five_frames()[0]) * 2], "bad_length"),
        (STREAM[: len(_five_frames()[0]) - 1], "bad_length"),
        (STREAM[:20], "bad_length"),
        (b"\x00" + STREAM[: len(_five_frames()[0])], "noise"),
        (b"GET / HTTP/1.0\r\n\r\n", "noise"),
        (b"", "noise"),
        (raw_frame(MsgType.LOGOUT, crc=0x1234), "bad_crc"),
        (raw_frame(MsgType.LOGOUT, version=0), "bad_version"),
        (raw_frame(MsgType.LOGOUT, length=600), "bad_length"),
    ],
    ids=[
        "extra-byte",
        "two-frames",
        "short",
        "short-header",
        "leading-byte",
        "http",
        "empty",
        "bad-crc",
        "bad-version",
        "length-over-512",
    ],
)
def test_datagram_that_is_not_one_good_frame_is_dropped(data: bytes, reason: str) -> None:
    """A datagram that is not exactly one good frame is an error with no reply."""
    result = decode_datagram(data)
    assert isinstance(result, DecodeError)
    assert result.reason == reason
    assert result.reply is None and not result.fatal


def test_datagram_of_unknown_type_gets_nack_3() -> None:
    """A well-framed datagram of an unknown type is answered with NACK 3 like on TCP."""
    result = decode_datagram(raw_frame(0x07, seq=5))
    assert isinstance(result, DecodeError) and result.reason == "unknown_type"
    assert result.reply is not None
    assert parse_nack(result.reply) == (0x07, 5, ev.Reject.UNSUPPORTED_TYPE)


def _random_stream(rng: random.Random) -> bytes:
    """Good frames (short heartbeats mostly) mixed with noise and broken frames."""
    term = NativeTerminalCodec(IDENT)
    good = _five_frames()
    parts = []
    for _ in range(rng.randrange(1, 12)):
        kind = rng.random()
        if kind < 0.5:
            parts.append(term.heartbeat(rng.randrange(256), rng.random() < 0.5, 70))
        elif kind < 0.7:
            parts.append(rng.choice(good))
        elif kind < 0.8:
            frame = rng.choice(good)
            parts.append(frame[:-1] + bytes([frame[-1] ^ 0x5A]))  # bad CRC
        elif kind < 0.85:
            parts.append(raw_frame(MsgType.HEARTBEAT, b"\x50\x00\x46", version=2))
        elif kind < 0.9:
            parts.append(raw_frame(MsgType.HEARTBEAT, b"\x50\x00\x46", ident=b"bad ident"))
        else:
            parts.append(rng.choice([b"\x00", b"\xd5", b"\x7e\xd5", b"hello", b"\xd5\x7e\x01"]))
    return b"".join(parts)


def _comparable(results: list[Inbound | DecodeError]) -> tuple[list[object], int]:
    """Results without the chunking-dependent noise reports, and the noise bytes they count."""
    kept: list[object] = []
    noise = 0
    for r in results:
        if isinstance(r, DecodeError) and r.reason == "noise" and not r.fatal:
            noise += int(r.detail.split()[0])
        else:
            kept.append(r)
    return kept, noise


def test_any_chunking_gives_the_same_frames_and_errors() -> None:
    """Whole reads (the fast path), random reads and single bytes (the buffered path) agree."""
    rng = random.Random(7)
    for _ in range(300):
        stream = _random_stream(rng)
        whole = NativeCodec().feed(stream)
        codec = NativeCodec()
        by_byte: list[Inbound | DecodeError] = []
        for i in range(len(stream)):
            by_byte += codec.feed(stream[i : i + 1])
        codec = NativeCodec()
        chunked: list[Inbound | DecodeError] = []
        pos = 0
        while pos < len(stream):
            step = rng.randrange(1, 80)
            chunked += codec.feed(stream[pos : pos + step])
            pos += step
        assert _comparable(whole) == _comparable(by_byte) == _comparable(chunked), stream
