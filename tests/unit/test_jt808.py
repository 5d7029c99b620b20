"""JT/T 808 codec: framing, published frames of both editions, replies, commands, simulator.

Published frames come from open-source JT/T 808 projects' tests and docs (named at each
constant).  Every one is first re-checked with our own XOR function, so a typo in a hex
string fails loudly instead of silently testing nothing.
"""

from __future__ import annotations

import functools
import operator
import random

import pytest

from dispatch.events import (
    CareAnswer,
    CarePrompt,
    CommandAck,
    Heartbeat,
    Location,
    LocationReport,
    Login,
    Logout,
    Register,
    Reject,
    Settings,
    Sos,
    SosTrigger,
)
from dispatch.protocol.base import DecodeError, Inbound, Outcome
from dispatch.protocol.jt808 import (
    EDITION_2013,
    EDITION_2019,
    Frame,
    FrameSplitter,
    Jt808Codec,
    bcd_time_to_epoch,
    bcd_to_ident,
    build_frame,
    compiled,
    epoch_to_bcd_time,
    escape,
    parse_frame,
    phone_to_bcd,
    unescape,
    xor_check,
)
from simulators.jt808_codec import Jt808TerminalCodec

# --- published frames -------------------------------------------------------------------

# cuteLittleDevil/go-jt808, protocol/model tests (2013 and 2019 editions).
GO_0001 = "7e000100050123456789017fff007b01c803bd7e"
GO_8001 = "7e8001000501234567890100007fff0002008e7e"
GO_8100 = "7e8100000e01234567890100000000003132333435363738393031377e"
GO_0002 = "7e0002000001234567890100008a7e"
GO_0102_2013 = "7e0102000b01234567890100003137323939383431373338b57e"
GO_0102_2019 = (
    "7e0102402f010000000001729984173800000b3137323939383431373338313233343536373839303132"
    "333435332e372e31350000000000000000000000000000227e"
)
GO_0100_2013 = (
    "7e0100002c0123456789010000001f007363640000007777772e3830382e636f6d000000000000000000"
    "3736353433323101b2e24131323334cc7e"
)
GO_0100_2019 = (
    "7e0100405301000000000172998417380000001f007363640000000000000000007777772e3830382e63"
    "6f6d00000000000000000000000000000000000000373635343332310000000000000000000000000000"
    "00000000000000000001b2e241313233343b7e"
)
GO_0200_ESCAPED = (
    "7e0200001c0123456789010000000004000000080007203b7d0202633df70138000300632410012359591c7e"
)
GO_0704 = (
    "7e0704003f0123456789010000000200001c000004000000080007203b7d0202633df701380003006324"
    "1001235959001c000004000000080007203b7d0202633df7013800030063241001235959b67e"
)
GO_SUBPACKET_0801 = "7E0801200500123456789002DE001A00022808000102537E"

# traccar HuabaoProtocolDecoderTest (captured 2013 terminals).
TRACCAR_SOS = (
    "7e0200002e094027587492000a000000010000000a03083db7001329f300000014000013041216495201"
    "0400000012360a0002341502cb0c20085c107e"
)
TRACCAR_BATTERY_E1 = (
    "7e0200002f017028775424038d000000000000000a0189dbeb04ca653a00000012014723040700074401"
    "040000000030011b31010ee1012dea020001dc7e"
)
TRACCAR_0704 = (
    "7E0704014301356777777707F5000801002600000000000000030159741206CBFD500172000000011605"
    "2709062401040000001D03020000002600000000000000030159746606CBFD50016B0000000116052709"
    "065301040000001D0302000000260000000000000003015975E406CBFE58013F00000001160527090727"
    "01040000001D0302000000260000000000000003015976DE06CBFF10012E000000011605270907560104"
    "0000001D0302000000260000000000000003015976BC06CBFED0012D0000000116052709083001040000"
    "001D0302000000260000000000000003015976FE06CBFEC001080000000116052709090001040000001D"
    "0302000000260000000000000003015976FE06CBFE7800FC0000000116052709093301040000001D0302"
    "000000260000000000000003015977A606CBFF3001080000000116052709100201040000001D03020000"
    "1F7E"
)
TRACCAR_0100_2011 = (
    "7E01000021013345678906000F002C012F373031313142534A2D4D3742203030303030303001D4C14238"
    "38383838B47E"
)
TRACCAR_0100_2013 = (
    "7E0100002D013511221122000500000000373031303748422D5230334742440000000000000000000000"
    "3233363631303402CBD5424136383630387E"
)
TRACCAR_0102 = "7E0102000E013511221122000661757468656E7469636174696F6E3F7E"
TRACCAR_0002 = "7e0002000004304832546500b7ca7e"
TRACCAR_8103 = (
    "7e8103001f4567890123450000020000001310627674656c656d61746963732e636f6d00000018040000139c817e"
)

# hylexus/xtream-codec docs and tests (2019 edition).
XTREAM_0100_2019 = (
    "7E010040560100000000013912344329007B000B00026964393837363534333231747970653030313233"
    "343536373831323334353637383837363534333231494430303030313233343536373831323334353637"
    "38383736353433323101B8CA4A2D313233343539257E"
)
XTREAM_0200_2019 = (
    "7E0200402D01000000000139123443210000003000000040000101CD41C2072901B00929029A005A2304"
    "2821314101040000029B0202004303020309300163897E"
)
XTREAM_8300_2019 = (
    "7e8300401a01000000000139123443290000010148656c6c6f576f726c6420babad7d62047424b20b1e0c2ebbb7e"
)

# A 2019 location report with a fix, quoted in a public JT/T 808 Java parser's demo.
DEMO_0200_2019_FIXED = (
    "7E0200404E0100000000040620020586004300000000000C0003023DD3CB067CB9A3052B000000552012"
    "03160406010400011BE9030200002504000000002B040000000030011F31011414040000000015040000"
    "0000160400000000170200000E7E"
)

# SmallChi/JT808 JT808_0x8300 test (2013 text message, flag 5).
SMALLCHI_8300 = "7E8300000D012345678900000105736D616C6C63686920353138027E"

# A 0x0003 logout captured by a public Python JT/T 808 decoder's test.
CAPTURED_0003 = "7e000300000191765333551ded207e"


def published(hex_frame: str) -> bytes:
    """The frame's bytes, after re-checking its check code with our own XOR function."""
    raw = bytes.fromhex(hex_frame)
    assert raw[0] == raw[-1] == 0x7E
    data = unescape(raw[1:-1])
    assert data is not None
    assert functools.reduce(operator.xor, data[:-1], 0) == data[-1] == xor_check(data[:-1])
    return raw


def expect_frame(header_hex: str, body_hex: str) -> bytes:
    """A frame assembled by hand from literal header and body hex (check by our xor_check).

    Fields may be separated by spaces for readability.
    """
    payload = bytes.fromhex(header_hex + " " + body_hex)
    return b"\x7e" + escape(payload + bytes((xor_check(payload),))) + b"\x7e"


def sent(data: bytes | None) -> bytes:
    """Bytes the codec must have produced (not None)."""
    assert data is not None
    return data


def frame_of(data: bytes | None) -> Frame:
    """The parsed frame inside one complete, delimited frame."""
    raw = unescape(sent(data)[1:-1])
    assert raw is not None
    return parse_frame(raw)


def inbounds(results: list[Inbound | DecodeError]) -> list[Inbound]:
    """The results, all of which must be Inbound."""
    assert all(isinstance(r, Inbound) for r in results), results
    return [r for r in results if isinstance(r, Inbound)]


def errors(results: list[Inbound | DecodeError]) -> list[DecodeError]:
    """The results, all of which must be DecodeError."""
    assert all(isinstance(r, DecodeError) for r in results), results
    return [r for r in results if isinstance(r, DecodeError)]


def events(results: list[Inbound | DecodeError]) -> list[object]:
    """The events of the Inbound items, errors left out."""
    return [r.event for r in results if isinstance(r, Inbound)]


def only(results: list[Inbound | DecodeError]) -> Inbound:
    """The single Inbound a one-frame feed must produce."""
    assert len(results) == 1 and isinstance(results[0], Inbound), results
    return results[0]


GMT8_2013_04_12_164952 = 1365756592.0  # 2013-04-12 08:49:52 UTC

# --- check code and escaping ------------------------------------------------------------


def test_xor_check_matches_plain_fold_for_every_length() -> None:
    """The fast XOR check equals a byte-by-byte XOR for short and long inputs alike."""
    rng = random.Random(808)
    for n in range(0, 1100, 7):
        data = rng.randbytes(n)
        assert xor_check(data) == functools.reduce(operator.xor, data, 0)


def test_escape_matches_standard_example_and_round_trips() -> None:
    """0x7E -> 7D 02 and 0x7D -> 7D 01, as in the standard's example; unescape undoes it."""
    assert escape(bytes.fromhex("30 7e 08 7d 55")) == bytes.fromhex("30 7d02 08 7d01 55")
    for data in (b"\x7e", b"\x7d", b"\x7d\x02", b"\x7d\x01", b"\x7e\x7d\x7e", bytes(range(256))):
        escaped = escape(data)
        assert b"\x7e" not in escaped
        assert unescape(escaped) == data


def test_unescape_rejects_malformed_escapes() -> None:
    """A 0x7D followed by anything but 01/02, or at the very end, is a bad escape."""
    for bad in ("7d03", "007d", "7d7d", "7d7d0102", "7d000102", "017d7e"):
        assert unescape(bytes.fromhex(bad)) is None, bad
    assert unescape(bytes.fromhex("7d0102")) == bytes.fromhex("7d02")


def test_escaped_byte_in_published_body_is_restored() -> None:
    """go-jt808's 0x0200 carries 7D 02 inside the latitude; it decodes to 0x7E."""
    frame = frame_of(published(GO_0200_ESCAPED))
    body = compiled["LocationBody"].parse(frame.body)
    assert body.lat == 119552894 == 0x07203B7E
    assert (body.alarm, body.status, body.lon) == (1024, 2048, 40058359)
    assert (body.altitude, body.speed, body.direction) == (312, 3, 99)
    assert body.time.hex() == "241001235959"


def test_flags_inside_body_survive_build_and_feed() -> None:
    """A body full of 0x7E/0x7D is escaped by build_frame and restored by the server codec."""
    body = compiled["GeneralResponse"].build(
        {"reply_serial": 0x7E7D, "reply_id": 0x7D7E, "result": 0}
    )
    frame = build_frame(0x0001, body, phone=phone_to_bcd("13800138000"), serial=0x7E7E)
    assert b"\x7e" not in frame[1:-1]
    assert frame_of(frame).body == body
    assert events(Jt808Codec().feed(frame)) == [
        CommandAck(ident="13800138000", ref_seq=0x7E7D, ok=True)
    ]


@pytest.mark.parametrize("target", [0x7E, 0x7D])
def test_check_code_that_needs_escaping_is_escaped_and_read_back(target: int) -> None:
    """A check code of 0x7E or 0x7D is escaped on build and unescaped before checking."""
    phone = phone_to_bcd("13800138000")
    serial = next(
        s
        for s in range(0x10000)
        if xor_check(bytes.fromhex("00020000") + phone + s.to_bytes(2, "big")) == target
    )
    frame = build_frame(0x0002, b"", phone=phone, serial=serial)
    assert frame[-3:] == bytes((0x7D, 0x02 if target == 0x7E else 0x01, 0x7E))
    assert events(Jt808Codec().feed(frame)) == [Heartbeat(ident="13800138000")]


# --- BCD fields -------------------------------------------------------------------------


def test_phone_bcd_both_editions_and_ident_strips_leading_zeros() -> None:
    """Phone numbers are left-padded BCD[6]/BCD[10]; the ident drops leading zeros."""
    assert phone_to_bcd("13800138000") == bytes.fromhex("013800138000")
    assert phone_to_bcd("13800138000", EDITION_2019) == bytes.fromhex("00000000013800138000")
    assert bcd_to_ident(bytes.fromhex("013800138000")) == "13800138000"
    assert bcd_to_ident(bytes.fromhex("00000000013800138000")) == "13800138000"
    assert bcd_to_ident(bytes(6)) == "0"
    with pytest.raises(ValueError):
        phone_to_bcd("1234567890123")
    with pytest.raises(ValueError):
        phone_to_bcd("12ab")


def test_bcd_time_is_gmt8_and_invalid_times_are_none() -> None:
    """BCD YYMMDDhhmmss is read as GMT+8; impossible dates give None; build round-trips."""
    assert bcd_time_to_epoch(bytes.fromhex("130412164952")) == GMT8_2013_04_12_164952
    assert bcd_time_to_epoch(bytes.fromhex("000000000000")) is None
    assert bcd_time_to_epoch(bytes.fromhex("2a0412164952")) is None
    assert epoch_to_bcd_time(GMT8_2013_04_12_164952) == bytes.fromhex("130412164952")


# --- published terminal frames, field by field ------------------------------------------


def test_published_2013_registration_fields() -> None:
    """go-jt808's 2013 0x0100: ident from BCD, maker/model/id with NUL padding stripped."""
    raw = published(GO_0100_2013)
    assert events(Jt808Codec().feed(raw)) == [
        Register(ident="12345678901", maker="cd", model="www.808.com", terminal_id="7654321")
    ]
    body = compiled["Registration2013"].parse(frame_of(raw).body)
    assert (body.province, body.city, body.plate_color) == (31, 115, 1)
    assert body.plate.decode("gbk") == "测A1234"


def test_published_2019_registrations_fields() -> None:
    """2019 0x0100 (go-jt808, xtream-codec): 11/30/30-byte fields, BCD[10] phone, GBK plate."""
    assert events(Jt808Codec().feed(published(GO_0100_2019))) == [
        Register(ident="17299841738", maker="cd", model="www.808.com", terminal_id="7654321")
    ]
    raw = published(XTREAM_0100_2019)
    assert events(Jt808Codec().feed(raw)) == [
        Register(
            ident="13912344329",
            maker="id987654321",
            model="type00123456781234567887654321",
            terminal_id="ID0000123456781234567887654321",
        )
    ]
    frame = frame_of(raw)
    assert (frame.edition, frame.version, frame.serial) == (EDITION_2019, 1, 0x7B)
    body = compiled["Registration2019"].parse(frame.body)
    assert (body.province, body.city) == (11, 2)
    assert body.plate.decode("gbk") == "甘J-123459"


def test_published_older_registration_layouts() -> None:
    """traccar's captures: a 2011-layout body (8-byte model) and a 2013 body both decode."""
    assert events(Jt808Codec().feed(published(TRACCAR_0100_2011))) == [
        Register(ident="13345678906", maker="70111", model="BSJ-M7B", terminal_id="0000000")
    ]
    raw = published(TRACCAR_0100_2013)
    assert events(Jt808Codec().feed(raw)) == [
        Register(ident="13511221122", maker="70107", model="HB-R03GBD", terminal_id="2366104")
    ]
    body = compiled["Registration2013"].parse(frame_of(raw).body)
    assert body.plate.decode("gbk") == "苏BA6860"


def test_published_authentication_both_editions() -> None:
    """0x0102: 2013 body is the code; 2019 has length-prefixed code, IMEI and software version."""
    assert events(Jt808Codec().feed(published(GO_0102_2013))) == [
        Login(ident="12345678901", auth_code="17299841738", firmware="")
    ]
    assert events(Jt808Codec().feed(published(TRACCAR_0102))) == [
        Login(ident="13511221122", auth_code="authentication", firmware="")
    ]
    raw = published(GO_0102_2019)
    assert events(Jt808Codec().feed(raw)) == [
        Login(ident="17299841738", auth_code="17299841738", firmware="3.7.15")
    ]
    body = compiled["Authentication2019"].parse(frame_of(raw).body)
    assert body.imei == b"123456789012345"


def test_published_heartbeat_logout_and_general_response() -> None:
    """0x0002 -> Heartbeat, 0x0003 -> Logout, 0x0001 -> CommandAck(ref_seq, ok=result==0)."""
    assert events(Jt808Codec().feed(published(GO_0002))) == [Heartbeat(ident="12345678901")]
    assert events(Jt808Codec().feed(published(TRACCAR_0002))) == [Heartbeat(ident="43048325465")]
    assert events(Jt808Codec().feed(published(CAPTURED_0003))) == [Logout(ident="19176533355")]
    assert events(Jt808Codec().feed(published(GO_0001))) == [
        CommandAck(ident="12345678901", ref_seq=123, ok=False)
    ]


def test_published_emergency_alarm_is_sos_with_signed_location() -> None:
    """traccar's alarm-bit-0 report: Sos with header serial, west longitude, GMT+8 time."""
    assert events(Jt808Codec().feed(published(TRACCAR_SOS))) == [
        Sos(
            ident="94027587492",
            seq=10,
            trigger=SosTrigger.BUTTON,
            location=Location(lat=50.871735, lon=-1.255923),
            terminal_time=GMT8_2013_04_12_164952,
            battery=None,
        )
    ]


def test_published_report_with_battery_item_gives_location_and_heartbeat() -> None:
    """Item 0xE1 = battery 45 %, 0x30 = CSQ 27 -> 87 %; location plus heartbeat, one reply."""
    results = Jt808Codec().feed(published(TRACCAR_BATTERY_E1))
    assert events(results) == [
        LocationReport(ident="17028775424", location=Location(lat=25.811947, lon=-80.37305)),
        Heartbeat(ident="17028775424", battery=45, signal=87),
    ]


def test_published_unfixed_report_has_no_location() -> None:
    """Status bit 1 clear: no Location; a report without items is still a liveness heartbeat."""
    assert events(Jt808Codec().feed(published(GO_0200_ESCAPED))) == [Heartbeat(ident="12345678901")]


def test_published_2019_location_reports() -> None:
    """2019 0x0200: unfixed report with CSQ 99 (unknown); fixed report with CSQ 31 = 100 %."""
    raw = published(XTREAM_0200_2019)
    assert events(Jt808Codec().feed(raw)) == [Heartbeat(ident="13912344321", signal=None)]
    body = compiled["LocationBody"].parse(frame_of(raw).body)
    assert body.alarm == (1 << 20) | (1 << 21)
    assert (body.lat, body.lon, body.altitude, body.speed) == (30228930, 120127920, 2345, 666)
    assert events(Jt808Codec().feed(published(DEMO_0200_2019_FIXED))) == [
        LocationReport(ident="40620020586", location=Location(lat=37.606347, lon=108.837283)),
        Heartbeat(ident="40620020586", signal=100),
    ]


def test_fix_outside_the_globe_is_dropped() -> None:
    """A 'fixed' position beyond 90/180 degrees is a broken receiver: no Location is reported."""
    body = compiled["LocationBody"].build({**_location(alarm=1), "lat": 119_552_894})
    frame = build_frame(0x0200, body, phone=phone_to_bcd("13800138000"), serial=1)
    [sos] = events(Jt808Codec().feed(frame))
    assert isinstance(sos, Sos) and sos.location is None


def test_published_location_batches() -> None:
    """0x0704: one event per contained report (traccar: 8 fixed; go-jt808: 2 unfixed)."""
    evs = events(Jt808Codec().feed(published(TRACCAR_0704)))
    assert len(evs) == 8 and all(isinstance(e, LocationReport) for e in evs)
    assert evs[0] == LocationReport(
        ident="13567777777", location=Location(lat=22.639634, lon=114.031952)
    )
    assert events(Jt808Codec().feed(published(GO_0704))) == [Heartbeat(ident="12345678901")] * 2


# --- replies ----------------------------------------------------------------------------


def test_heartbeat_reply_equals_published_8001() -> None:
    """A heartbeat with serial 0x7FFF is answered with go-jt808's 0x8001 bytes exactly."""
    heartbeat = build_frame(0x0002, b"", phone=phone_to_bcd("12345678901"), serial=0x7FFF)
    codec = Jt808Codec()
    assert codec.reply(only(codec.feed(heartbeat)), Outcome.accept()) == published(GO_8001)


def test_registration_reply_equals_published_8100() -> None:
    """go-jt808's 2013 registration answered OK with code 12345678901 gives its 0x8100 bytes."""
    codec = Jt808Codec()
    inbound = only(codec.feed(published(GO_0100_2013)))
    reply = codec.reply(inbound, Outcome.accept(auth_code="12345678901"))
    assert reply == published(GO_8100)


def test_registration_refused_and_try_later() -> None:
    """UNKNOWN_DEVICE -> 0x8100 result 4 without code; TRY_LATER -> no reply (terminal retries)."""
    codec = Jt808Codec()
    inbound = only(codec.feed(published(GO_0100_2013)))
    assert codec.reply(inbound, Outcome.reject(Reject.UNKNOWN_DEVICE)) == expect_frame(
        "8100 0003 012345678901 0000", "0000 04"
    )
    assert codec.reply(inbound, Outcome.reject(Reject.TRY_LATER)) is None


def test_general_replies_exact_bytes_and_platform_serial() -> None:
    """Auth/heartbeat/location/logout get 0x8001 (0 ok, 1 fail) with our own rising serial."""
    codec = Jt808Codec()
    auth = only(codec.feed(published(TRACCAR_0102)))
    assert codec.reply(auth, Outcome.accept()) == expect_frame(
        "8001 0005 013511221122 0000", "0006 0102 00"
    )
    assert codec.reply(auth, Outcome.reject(Reject.NOT_LOGGED_IN)) == expect_frame(
        "8001 0005 013511221122 0001", "0006 0102 01"
    )
    heartbeat = only(codec.feed(published(TRACCAR_0002)))
    assert codec.reply(heartbeat, Outcome.accept()) == expect_frame(
        "8001 0005 043048325465 0002", "00b7 0002 00"
    )
    first, second = inbounds(codec.feed(published(TRACCAR_BATTERY_E1)))
    assert codec.reply(first, Outcome.accept()) == expect_frame(
        "8001 0005 017028775424 0003", "038d 0200 00"
    )
    assert codec.reply(second, Outcome.accept()) is None
    logout = only(codec.feed(published(CAPTURED_0003)))
    assert codec.reply(logout, Outcome.accept()) == expect_frame(
        "8001 0005 019176533355 0004", "1ded 0003 00"
    )
    ack = only(codec.feed(published(GO_0001)))
    assert codec.reply(ack, Outcome.accept()) is None


def test_reply_to_2019_frame_uses_2019_header() -> None:
    """A 2019 terminal is answered in 2019: version flag, version byte, BCD[10] phone."""
    codec = Jt808Codec()
    inbound = only(codec.feed(published(GO_0102_2019)))
    assert codec.reply(inbound, Outcome.accept()) == expect_frame(
        "8001 4005 01 00000000017299841738 0000", "0000 0102 00"
    )


def test_sos_reply_confirms_alarm_or_stays_silent() -> None:
    """Accepted SOS -> 0x8001 result 4 (alarm confirmed); TRY_LATER -> None so it is resent."""
    codec = Jt808Codec()
    sos = only(codec.feed(published(TRACCAR_SOS)))
    assert codec.reply(sos, Outcome.reject(Reject.TRY_LATER)) is None
    assert codec.reply(sos, Outcome.accept()) == expect_frame(
        "8001 0005 094027587492 0000", "000a 0200 04"
    )
    assert codec.reply(sos, Outcome.reject(Reject.NOT_LOGGED_IN)) == expect_frame(
        "8001 0005 094027587492 0001", "000a 0200 01"
    )


def test_batch_reply_rides_on_the_sos() -> None:
    """In a 0x0704 with an alarm, only the SOS answers, so TRY_LATER leaves the batch unacked."""
    body = compiled["LocationBatchBody"].build(
        {"type": 0, "locations": [_location(alarm=0), _location(alarm=1)]}
    )
    frame = build_frame(0x0704, body, phone=phone_to_bcd("13800138000"), serial=9)
    codec = Jt808Codec()
    first, second = codec.feed(frame)
    assert isinstance(first, Inbound) and isinstance(first.event, LocationReport)
    assert isinstance(second, Inbound) and isinstance(second.event, Sos)
    assert second.event.seq == 9
    assert codec.reply(first, Outcome.accept()) is None
    assert codec.reply(second, Outcome.reject(Reject.TRY_LATER)) is None
    assert codec.reply(second, Outcome.accept()) == expect_frame(
        "8001 0005 013800138000 0000", "0009 0704 04"
    )


def _location(alarm: int) -> dict[str, object]:
    """A fixed 0x0200 body in Wenzhou, as construct build input."""
    return {
        "alarm": alarm,
        "status": 0b10,
        "lat": 27_994_000,
        "lon": 120_699_000,
        "altitude": 10,
        "speed": 0,
        "direction": 0,
        "time": bytes.fromhex("250101080000"),
        "additional": [],
    }


# --- commands ---------------------------------------------------------------------------


def test_text_message_declarations_build_published_8300_frames() -> None:
    """Our 0x8300 declarations build SmallChi's 2013 and xtream-codec's 2019 frames exactly."""
    body = compiled["TextMessage2013"].build({"flag": 5, "text": b"smallchi 518"})
    frame = build_frame(0x8300, body, phone=phone_to_bcd("12345678900"), serial=1)
    assert frame == published(SMALLCHI_8300)
    body = compiled["TextMessage2019"].build(
        {"flag": 1, "text_type": 1, "text": "HelloWorld 汉字 GBK 编码".encode("gbk")}
    )
    phone = phone_to_bcd("13912344329", EDITION_2019)
    frame = build_frame(0x8300, body, phone=phone, serial=0, edition=EDITION_2019, version=1)
    assert frame == bytes.fromhex(XTREAM_8300_2019) == published(XTREAM_8300_2019)


def test_set_params_declaration_builds_published_8103() -> None:
    """Our 0x8103 declaration builds traccar's published set-parameters frame exactly."""
    body = compiled["SetParamsBody"].build(
        {
            "params": [
                {"id": 0x13, "value": b"bvtelematics.com"},
                {"id": 0x18, "value": (5020).to_bytes(4, "big")},
            ]
        }
    )
    frame = build_frame(0x8103, body, phone=phone_to_bcd("456789012345"), serial=0)
    assert frame == published(TRACCAR_8103)


def test_care_prompt_command_bytes_both_editions() -> None:
    """CarePrompt -> 0x8300, flag 0x0C (display + TTS), GBK text with round id, serial = seq."""
    text = "您好，请按键确认平安（42）".encode("gbk").hex()
    codec = Jt808Codec()
    codec.feed(published(GO_0002))
    length = f"{1 + len(text) // 2:04x}"
    assert codec.command("12345678901", CarePrompt(round_id=42), seq=0x0102) == expect_frame(
        f"8300 {length} 012345678901 0102", "0c " + text
    )
    codec = Jt808Codec()
    codec.feed(published(GO_0102_2019))
    length = f"{0x4000 | (2 + len(text) // 2):04x}"
    assert codec.command("17299841738", CarePrompt(round_id=42), seq=7) == expect_frame(
        f"8300 {length} 01 00000000017299841738 0007", "0c 01 " + text
    )


def test_settings_command_bytes() -> None:
    """Settings -> 0x8103: 0x0001 heartbeat DWORD, then one 0x0040 STRING per contact number."""
    codec = Jt808Codec()
    frame = codec.command("13800138000", Settings(300, ("13900000000", "110")), seq=5)
    numbers = b"13900000000".hex()
    assert frame == expect_frame(
        "8103 0022 013800138000 0005",
        f"03 00000001 04 0000012c 00000040 0b {numbers} 00000040 03 313130",
    )


def test_command_uses_terminals_phone_and_edition() -> None:
    """Commands follow the edition and the raw phone field the terminal last used."""
    codec = Jt808Codec()
    codec.feed(published(XTREAM_0200_2019))
    frame = frame_of(codec.command("13912344321", Settings(60), 1))
    assert (frame.edition, frame.version, frame.phone.hex()) == (2019, 1, "00000000013912344321")
    assert Jt808Codec().command("not-a-phone", Settings(60), 1) is None


# --- stream handling --------------------------------------------------------------------

STREAM_FRAMES = [
    GO_0100_2013,
    GO_0102_2019,
    GO_0200_ESCAPED,
    TRACCAR_SOS,
    GO_0704,
    TRACCAR_BATTERY_E1,
    GO_0002,
]


def _stream() -> bytes:
    parts = [published(h) for h in STREAM_FRAMES]
    bad_check = bytearray(published(GO_0002))
    bad_check[-2] ^= 0x01
    return (
        b"\x00\x01noise"
        + parts[0]
        + parts[1]
        + b"junk between frames"
        + parts[2]
        + bytes(bad_check)
        + parts[3]
        + b"\x7e"  # an extra flag: "7E 7E" before the next frame
        + parts[4]
        + parts[5]
        + parts[6]
    )


def test_stream_decodes_frames_noise_and_bad_check_in_order() -> None:
    """Noise runs give one error each, a bad check is reported, every good frame decodes."""
    results = Jt808Codec().feed(_stream())
    kinds = [r.reason if isinstance(r, DecodeError) else type(r.event).__name__ for r in results]
    assert kinds == [
        "noise",
        "Register",
        "Login",
        "noise",
        "Heartbeat",
        "bad_check",
        "Sos",
        "Heartbeat",
        "Heartbeat",
        "LocationReport",
        "Heartbeat",
        "Heartbeat",
    ]


def test_every_split_point_gives_identical_results() -> None:
    """Splitting the stream at any byte boundary yields exactly the whole-stream results."""
    stream = _stream()
    whole = Jt808Codec().feed(stream)
    for cut in range(1, len(stream)):
        codec = Jt808Codec()
        assert codec.feed(stream[:cut]) + codec.feed(stream[cut:]) == whole, cut


def test_one_byte_at_a_time_gives_identical_results() -> None:
    """Feeding one byte per call yields exactly the whole-stream results."""
    stream = _stream()
    codec = Jt808Codec()
    bytewise = [r for i in range(len(stream)) for r in codec.feed(stream[i : i + 1])]
    assert bytewise == Jt808Codec().feed(stream)


def test_bad_check_then_good_frame() -> None:
    """A frame with a wrong check code is dropped; the next good frame still decodes."""
    bad = bytearray(published(GO_0002))
    bad[5] ^= 0x10
    results = Jt808Codec().feed(bytes(bad) + published(TRACCAR_0002))
    assert isinstance(results[0], DecodeError) and results[0].reason == "bad_check"
    assert results[0].reply is None
    assert events(results[1:]) == [Heartbeat(ident="43048325465")]


def test_bad_escape_is_reported_and_stream_continues() -> None:
    """7D followed by anything but 01/02 inside a frame is bad_escape; the next frame decodes."""
    results = Jt808Codec().feed(b"\x7e\x00\x02\x7d\x03\x7e" + published(GO_0002))
    assert isinstance(results[0], DecodeError) and results[0].reason == "bad_escape"
    assert events(results[1:]) == [Heartbeat(ident="12345678901")]


def test_lying_body_length_is_bad_length() -> None:
    """A body length in the attributes that disagrees with the frame is bad_length."""
    payload = bytes.fromhex("0002 0003 012345678901 0000")  # claims 3 body bytes, has 0
    frame = b"\x7e" + escape(payload + bytes((xor_check(payload),))) + b"\x7e"
    [error] = Jt808Codec().feed(frame)
    assert isinstance(error, DecodeError) and error.reason == "bad_length"


def test_adjacent_flags_are_end_and_start() -> None:
    """7E 7E between frames and a leading 7E 7E are delimiters, not errors."""
    hb = published(GO_0002)
    results = Jt808Codec().feed(b"\x7e" + hb + hb + b"\x7e\x7e" + hb)
    assert events(results) == [Heartbeat(ident="12345678901")] * 3
    assert not [r for r in results if isinstance(r, DecodeError)]


def test_oversized_frame_resyncs_at_next_flag() -> None:
    """A frame past max_frame without a closing 7E is oversized; the next frame decodes."""
    stream = b"\x7e" + b"\x01" * 100 + b"\x7e" + published(GO_0002)
    whole = Jt808Codec(max_frame=64).feed(stream)
    [oversized] = errors(whole[:1])
    assert oversized.reason == "oversized"
    assert events(whole[1:]) == [Heartbeat(ident="12345678901")]
    codec = Jt808Codec(max_frame=64)
    assert [r for b in stream for r in codec.feed(bytes((b,)))] == whole


def test_endless_noise_is_fatal() -> None:
    """More than 4096 bytes without a valid frame is fatal; the codec then stays silent."""
    codec = Jt808Codec()
    results = errors(codec.feed(b"\x00" * 5000))
    assert [(r.reason, r.fatal) for r in results] == [("noise", False), ("noise", True)]
    assert codec.feed(published(GO_0002)) == []


def test_good_frames_reset_the_noise_budget() -> None:
    """Noise separated by valid frames never becomes fatal."""
    codec = Jt808Codec()
    for _ in range(5):
        results = codec.feed(b"\x00" * 3000 + published(GO_0002))
        assert not any(isinstance(r, DecodeError) and r.fatal for r in results)


def test_feed_never_raises_on_garbage() -> None:
    """Random bytes rich in 7E/7D produce only DecodeErrors or Inbounds, never exceptions."""
    rng = random.Random(7)
    for _ in range(200):
        codec = Jt808Codec()
        data = bytes(rng.choice((0x7E, 0x7D, 0x01, 0x02, rng.randrange(256))) for _ in range(300))
        for r in codec.feed(data):
            assert isinstance(r, DecodeError | Inbound)


def test_splitter_alone_yields_frames_with_header_fields() -> None:
    """The frame splitter exposes edition, version, phone, serial and body of each frame."""
    [frame] = FrameSplitter().feed(published(GO_0102_2019))
    assert not isinstance(frame, DecodeError)
    assert (frame.msg_id, frame.edition, frame.version, frame.ident) == (
        0x0102,
        EDITION_2019,
        1,
        "17299841738",
    )


# --- unknown ids, malformed bodies, sub-packets ------------------------------------------


def test_unknown_message_id_is_answered_unsupported() -> None:
    """A well-checked frame with an id we do not handle -> unknown_type + 0x8001 result 3."""
    frame = build_frame(0x0900, b"\x01\x02", phone=phone_to_bcd("13800138000"), serial=0x22)
    [error] = Jt808Codec().feed(frame)
    assert isinstance(error, DecodeError) and error.reason == "unknown_type"
    assert error.reply == expect_frame("8001 0005 013800138000 0000", "0022 0900 03")


def test_malformed_body_is_answered_message_error() -> None:
    """A known id whose body does not parse -> malformed + 0x8001 result 2."""
    frame = build_frame(0x0200, b"\x00" * 10, phone=phone_to_bcd("13800138000"), serial=3)
    [error] = Jt808Codec().feed(frame)
    assert isinstance(error, DecodeError) and error.reason == "malformed"
    assert error.reply == expect_frame("8001 0005 013800138000 0000", "0003 0200 02")


def test_encrypted_body_is_refused_as_unsupported() -> None:
    """An RSA-flagged body (attribute bit 10) is not decoded; 0x8001 result 3."""
    payload = bytes.fromhex("0002 0400 013800138000 0004")  # bit 10: RSA
    frame = b"\x7e" + escape(payload + bytes((xor_check(payload),))) + b"\x7e"
    [error] = Jt808Codec().feed(frame)
    assert isinstance(error, DecodeError) and error.reason == "malformed"
    assert error.reply == expect_frame("8001 0005 013800138000 0000", "0004 0002 03")


def test_published_sub_packet_is_held_and_acknowledged() -> None:
    """go-jt808's sub-packet 2/26 of a 0x0801 is held and acknowledged with 0x8001 result 0."""
    [held] = Jt808Codec().feed(published(GO_SUBPACKET_0801))
    assert isinstance(held, DecodeError) and held.reason == "sub_packet" and not held.fatal
    assert held.reply == expect_frame("8001 0005 001234567890 0000", "02de 0801 00")


@pytest.mark.parametrize("order", [(1, 2, 3), (3, 1, 2)])
def test_sub_packets_reassemble_into_one_message(order: tuple[int, int, int]) -> None:
    """Three sub-packets of a 0x0704, in any order, decode as one batch after the last."""
    body = compiled["LocationBatchBody"].build(
        {"type": 0, "locations": [_location(alarm=0), _location(alarm=1)]}
    )
    parts = [body[:10], body[10:40], body[40:]]
    phone = phone_to_bcd("13800138000")
    frames = {
        i: build_frame(0x0704, parts[i - 1], phone=phone, serial=99 + i, packet=(3, i))
        for i in (1, 2, 3)
    }
    codec = Jt808Codec()
    held = [codec.feed(frames[i]) for i in order[:2]]
    for (error,), index in zip(held, order[:2], strict=True):
        assert isinstance(error, DecodeError) and error.reason == "sub_packet"
        ack = compiled["GeneralResponse"].parse(frame_of(error.reply).body)
        assert (ack.reply_serial, ack.reply_id, ack.result) == (99 + index, 0x0704, 0)
    report, sos = codec.feed(frames[order[2]])
    assert isinstance(report, Inbound) and isinstance(report.event, LocationReport)
    assert isinstance(sos, Inbound) and isinstance(sos.event, Sos)
    assert sos.event.seq == 100  # the first sub-packet's serial names the message
    reply = codec.reply(sos, Outcome.accept())
    ack = compiled["GeneralResponse"].parse(frame_of(reply).body)
    assert (ack.reply_serial, ack.reply_id, ack.result) == (99 + order[2], 0x0704, 4)


def test_pending_sub_packet_groups_are_bounded() -> None:
    """Only a few incomplete messages are held; the stalest is dropped when more arrive."""
    phone = phone_to_bcd("13800138000")
    codec = Jt808Codec()
    for group in range(5):
        codec.feed(build_frame(0x0704, b"\x00", phone=phone, serial=1000 * group, packet=(2, 1)))
    # Group 0 was evicted, so its second half starts a new incomplete message.
    [held] = codec.feed(build_frame(0x0704, b"\x00", phone=phone, serial=1, packet=(2, 2)))
    assert isinstance(held, DecodeError) and held.reason == "sub_packet"


# --- terminal simulator codec <-> server codec ------------------------------------------


@pytest.mark.parametrize("edition", [EDITION_2013, EDITION_2019])
def test_round_trip_every_terminal_message(edition: int) -> None:
    """Every frame the simulator builds decodes on the server; every reply decodes back."""
    term = Jt808TerminalCodec("13800138000", edition)
    server = Jt808Codec()
    ident = "13800138000"

    register = only(server.feed(term.login()))
    assert register.event == Register(
        ident=ident, maker="DSPCH", model="SIM-1", terminal_id="0138000"
    )
    assert term.feed(sent(server.reply(register, Outcome.accept(auth_code="A1")))) == [
        {"type": "register_ack", "result": 0, "auth_code": "A1", "serial": 0}
    ]
    assert term.auth_code == "A1"

    login = only(server.feed(term.login()))
    firmware = "dispatch-sim 1.0" if edition == EDITION_2019 else ""
    assert login.event == Login(ident=ident, auth_code="A1", firmware=firmware)
    assert term.feed(sent(server.reply(login, Outcome.accept()))) == [
        {"type": "ack", "reply_id": 0x0102, "serial": 1, "result": 0, "key": None}
    ]

    beat = only(server.feed(term.heartbeat(battery=80, charging=False, signal=100)))
    assert beat.event == Heartbeat(ident=ident, battery=80, signal=100)
    assert only(server.feed(term.keepalive())).event == Heartbeat(ident=ident)

    where = Location(lat=-27.994, lon=-120.699)
    frame, key = term.sos(SosTrigger.BUTTON, where, 1_735_689_600.0, 55)
    assert isinstance(key, int)
    sos = only(server.feed(frame))
    assert sos.event == Sos(
        ident=ident,
        seq=key,
        trigger=SosTrigger.BUTTON,
        location=where,
        terminal_time=1_735_689_600.0,
        battery=55,
    )
    [ack] = term.feed(sent(server.reply(sos, Outcome.accept())))
    assert ack["key"] == key and ack["result"] == 4
    assert only(server.feed(frame)).event == sos.event  # a resend keeps its serial

    fall, _ = term.sos(SosTrigger.FALL, None, 1_735_689_600.0, None)
    fall_event = only(server.feed(fall)).event
    assert isinstance(fall_event, Sos) and fall_event.trigger == SosTrigger.FALL

    assert only(server.feed(term.location(where))).event == LocationReport(ident, where)
    assert only(server.feed(term.logout())).event == Logout(ident=ident)

    assert term.feed(sent(server.command(ident, CarePrompt(round_id=9), seq=40))) == [
        {"type": "text", "text": "您好，请按键确认平安（9）", "flag": 0x0C, "serial": 40}
    ]
    assert term.feed(sent(server.command(ident, Settings(120, ("13900000000",)), seq=41))) == [
        {
            "type": "settings",
            "heartbeat_interval_s": 120,
            "contact_numbers": ["13900000000"],
            "serial": 41,
        }
    ]
    confirm = only(server.feed(term.general_response(40, 0x8300, 0)))
    assert confirm.event == CommandAck(ident=ident, ref_seq=40, ok=True)
    assert term.care_answer(9, CareAnswer.OK) is None


def test_terminal_codec_reports_refused_registration_and_errors() -> None:
    """A refused 0x8100 stores no code; garbage from the server is an error dict."""
    term = Jt808TerminalCodec("13800138000")
    server = Jt808Codec()
    inbound = only(server.feed(term.register()))
    out = term.feed(sent(server.reply(inbound, Outcome.reject(Reject.UNKNOWN_DEVICE))))
    assert out == [{"type": "register_ack", "result": 4, "auth_code": None, "serial": 0}]
    assert term.auth_code is None
    assert term.feed(b"\x7e\x01\x02\x7e")[0]["type"] == "error"
