"""docs/protocol.md's hex examples are real frames: right CRC, built and decoded by the code.

Each example in the doc is a fenced block with info string ``hex`` preceded by a comment
``<!-- example: NAME from=terminal|server type=0xTT ident=... seq=N field=value ... -->``.
Payload fields are flat: ``lat_e6``/``lon_e6``/``accuracy_m`` form the location block of a
heartbeat or SOS; ``numbers`` is a comma-separated list.  Inside a block, text after ``#``
is an annotation.  The block may be followed by a ``Whole frame (N bytes): `HEX` `` line.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import pytest

from dispatch import events as ev
from dispatch.protocol import native_format as fmt
from dispatch.protocol.base import Inbound
from dispatch.protocol.native import FrameRef, NativeCodec
from dispatch.protocol.native_format import MsgType
from simulators.native_codec import NativeTerminalCodec

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
IDENT = "860000000000001"

_EXAMPLE = re.compile(
    r"<!--\s*example:\s*(?P<spec>[^>]*?)\s*-->\n```hex\n(?P<body>.*?)```\n"
    r"(?:\nWhole frame \((?P<size>\d+) bytes\): `(?P<whole>[0-9A-Fa-f]+)`)?",
    re.DOTALL,
)
_STRING_KEYS = {"name", "from", "ident", "firmware"}
_LIST_KEYS = {"numbers"}
_HEADER_KEYS = {"name", "from", "type", "ident", "seq"}
_LOCATION_KEYS = ("lat_e6", "lon_e6", "accuracy_m")


def crc16_ccitt_false(data: bytes) -> int:
    """Bitwise CRC-16/CCITT-FALSE, written independently of the code under test."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def _parse_spec(spec: str) -> dict[str, Any]:
    name, *pairs = spec.split()
    fields: dict[str, Any] = {"name": name}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        assert sep, f"example {name}: {pair!r} is not key=value"
        assert key not in fields, f"example {name}: {key} given twice"
        if key in _STRING_KEYS:
            fields[key] = value
        elif key in _LIST_KEYS:
            fields[key] = value.split(",") if value else []
        else:
            fields[key] = int(value, 0)
    return fields


def _parse_hex(body: str) -> bytes:
    return bytes.fromhex("".join(line.split("#", 1)[0] for line in body.splitlines()))


def _examples() -> list[dict[str, Any]]:
    text = DOC.read_text(encoding="utf-8")
    found = []
    for m in _EXAMPLE.finditer(text):
        ex = _parse_spec(m.group("spec"))
        ex["frame"] = _parse_hex(m.group("body"))
        ex["whole"] = bytes.fromhex(m.group("whole")) if m.group("whole") else None
        ex["size"] = int(m.group("size")) if m.group("size") else None
        found.append(ex)
    return found


def _payload(ex: dict[str, Any]) -> dict[str, Any]:
    payload = {k: v for k, v in ex.items() if k not in _HEADER_KEYS | {"frame", "whole", "size"}}
    if ex["type"] in (MsgType.HEARTBEAT, MsgType.SOS):
        has_loc = "lat_e6" in payload
        payload["location"] = {k: payload.pop(k) for k in _LOCATION_KEYS} if has_loc else None
    return payload


BERLIN = ev.Location(52.520008, 13.404954, 12)

# What each example decodes to: an event (terminal -> server) or the simulator's dict.
EXPECTED: dict[str, Any] = {
    "login": ev.Login(IDENT, "1.4.2", 1),
    "heartbeat": ev.Heartbeat(IDENT, 80, True, 70, None),
    "heartbeat-location": ev.Heartbeat(IDENT, None, False, 55, BERLIN),
    "sos": ev.Sos(IDENT, 4, ev.SosTrigger.BUTTON, BERLIN, 1700000000.0, 64),
    "sos-no-location": ev.Sos(IDENT, 5, ev.SosTrigger.FALL, None, None, 64),
    "ack-from-terminal": ev.CommandAck(IDENT, 17, True),
    "care-answer": ev.CareCheckAnswer(IDENT, 4242, ev.CareAnswer.OK),
    "location": ev.LocationReport(IDENT, ev.Location(-34.603722, -58.381592, None)),
    "nack-from-terminal": ev.CommandAck(IDENT, 18, False),
    "logout": ev.Logout(IDENT),
    "ack": {"type": "ack", "seq": 0, "key": ("sos", 4), "server_time": 1700000003},
    "nack": {"type": "nack", "seq": 0, "key": ("heartbeat", 2), "reason": "not_logged_in"},
    "care-prompt": {
        "type": "care_prompt",
        "seq": 17,
        "round_id": 4242,
        "pattern": 3,
        "window_s": 300,
    },
    "settings": {
        "type": "settings",
        "seq": 18,
        "heartbeat_interval_s": 60,
        "numbers": ["+4930123456", "112"],
    },
}

EXAMPLES = _examples()


def test_crc_check_value() -> None:
    """The test's own CRC and the code's CRC both give the CRC-16/CCITT-FALSE check 0x29B1."""
    assert crc16_ccitt_false(b"123456789") == 0x29B1
    assert fmt.crc16(b"123456789") == 0x29B1


def test_every_hex_block_is_an_annotated_example() -> None:
    """Every ```hex block in the doc has an example comment the parser understands."""
    text = DOC.read_text(encoding="utf-8")
    assert text.count("```hex") == len(EXAMPLES) > 0


def test_examples_cover_every_message_type_and_have_expectations() -> None:
    """Each message type has an example, and every example has an expected decode here."""
    names = [ex["name"] for ex in EXAMPLES]
    assert len(names) == len(set(names))
    assert set(names) == set(EXPECTED)
    assert {ex["type"] for ex in EXAMPLES} == {int(t) for t in MsgType}
    both_ways = {(ex["type"], ex["from"]) for ex in EXAMPLES if ex["type"] >= MsgType.ACK}
    assert {(MsgType.ACK, "terminal"), (MsgType.ACK, "server")} <= both_ways


def test_doc_names_every_type_and_reject_code() -> None:
    """The doc lists every message type and every NACK reason code with its value."""
    text = DOC.read_text(encoding="utf-8")
    for t in MsgType:
        assert re.search(rf"\|\s*0x{t:02X}\s*\|\s*{t.name}\s*\|", text), t
    for r in ev.Reject:
        assert re.search(rf"\|\s*{int(r)}\s*\|\s*{r.name}\s*\|", text), r
    assert "0x29B1" in text and "0x1021" in text and "0xFFFF" in text


@pytest.mark.parametrize("ex", EXAMPLES, ids=[ex["name"] for ex in EXAMPLES])
class TestExample:
    def test_header_and_crc(self, ex: dict[str, Any]) -> None:
        """Header fields match the comment and the CRC is right over version..payload."""
        frame = ex["frame"]
        magic, version, length, msg_type, ident, seq = struct.unpack_from(">2sBHB16sI", frame)
        assert magic == b"\xd5\x7e" and version == 1
        assert length == len(frame) - 28 <= 512
        assert msg_type == ex["type"]
        assert ident == ex["ident"].encode("ascii").ljust(16, b"\x00")
        assert seq == ex["seq"]
        assert crc16_ccitt_false(frame[2:-2]) == int.from_bytes(frame[-2:], "big")

    def test_whole_frame_line_matches_block(self, ex: dict[str, Any]) -> None:
        """The one-line copy of the frame under the block is the same bytes."""
        if ex["whole"] is not None:
            assert ex["whole"] == ex["frame"]
            assert ex["size"] == len(ex["frame"])

    def test_status_bit_matches_location(self, ex: dict[str, Any]) -> None:
        """Status bit 1 is set exactly when the example carries a location block."""
        if ex["type"] in (MsgType.HEARTBEAT, MsgType.SOS):
            assert bool(ex["status"] & 0x02) == ("lat_e6" in ex)

    def test_build_frame_reproduces_bytes(self, ex: dict[str, Any]) -> None:
        """build_frame with the comment's fields produces exactly the documented bytes."""
        built = fmt.build_frame(ex["type"], ex["ident"], ex["seq"], _payload(ex))
        assert built.hex(" ") == ex["frame"].hex(" ")

    def test_decodes_to_expected(self, ex: dict[str, Any]) -> None:
        """The receiving side decodes the example to the expected event or message."""
        expected = EXPECTED[ex["name"]]
        if ex["from"] == "terminal":
            results = NativeCodec().feed(ex["frame"])
            assert results == [Inbound(expected, FrameRef(ex["type"], ex["seq"], ex["ident"]))]
        else:
            assert ex["from"] == "server"
            assert NativeTerminalCodec.decode(ex["frame"]) == expected
