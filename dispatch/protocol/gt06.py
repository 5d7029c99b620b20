"""GT06 (Concox and clones) over TCP: bytes <-> protocol-neutral events.

Three layers, each usable on its own:

* :func:`crc16_x25` and the ``construct`` declarations below describe the wire
  format once; the server codec parses with them and builds replies/commands
  with them, and the terminal simulator (``simulators/gt06_codec.py``) builds
  terminal frames and parses server frames with the very same declarations.
* :class:`Gt06FrameReader` turns a TCP byte stream into whole, CRC-checked
  frames (reassembly and resynchronisation; see ``docs/protocol-gt06.md``).
* :class:`Gt06Codec` is the :class:`~dispatch.protocol.base.StreamCodec` for one
  connection: frames -> :mod:`dispatch.events`, outcomes -> acks, commands ->
  ``0x80`` online-command frames.

Field facts come from the Concox documents (GT06, JM-VL03 v1.1.2) and were
checked against frames captured by open-source decoders; the unit tests pin
them.
"""

from __future__ import annotations

import calendar
import re
import struct
from typing import Any, NamedTuple

from construct import (
    Adapter,
    BitsInteger,
    BitStruct,
    Bytes,
    Checksum,
    Const,
    Construct,
    ConstructError,
    Flag,
    GreedyBytes,
    IfThenElse,
    Int8ub,
    Int16ub,
    Int24ub,
    Int32ub,
    Int64ub,
    Nibble,
    RawCopy,
    Rebuild,
    Struct,
    ValidationError,
    len_,
    this,
)

from dispatch.events import (
    CareAnswer,
    CareCheckAnswer,
    CarePrompt,
    Command,
    CommandAck,
    DeviceAlarm,
    Heartbeat,
    Location,
    LocationReport,
    Login,
    Settings,
    Sos,
    SosTrigger,
    TerminalEvent,
)
from dispatch.protocol.base import DecodeError, Inbound, Outcome

__all__ = [
    "ACKED_PROTOCOLS",
    "ALARM_CODE_FALL",
    "ALARM_CODE_SOS",
    "ALARM_CODES",
    "ALARM_STRUCTS",
    "BODY_LONG",
    "BODY_SHORT",
    "CELL_2G",
    "CELL_4G",
    "CELL_WIDE",
    "COMMAND_TEXT",
    "DATETIME",
    "FRAME_LONG",
    "FRAME_SHORT",
    "GPS_BLOCK",
    "HEARTBEAT_STATUS",
    "HEARTBEAT_STATUS_SHORT",
    "LBS_ALARM_STRUCTS",
    "LBS_MULTI",
    "LBS_PLAIN",
    "LBS_WIDE",
    "LBS_WITH_LENGTH",
    "LOCATION_12",
    "LOCATION_22",
    "LOCATION_A0",
    "LOGIN_BASIC",
    "LOGIN_EXTENDED",
    "MAX_NOISE",
    "PROTO",
    "STATUS_BLOCK",
    "STRING_INFO",
    "TERMINAL_INFO",
    "VOLTAGE_LEVEL_PERCENT",
    "Gt06Codec",
    "Gt06Ctx",
    "Gt06FrameReader",
    "RawFrame",
    "alarm_struct",
    "build_ack",
    "build_frame",
    "build_online_command",
    "crc16_x25",
    "settings_texts",
]


# --- CRC-16/X-25 ("CRC-ITU" in the vendor documents) -------------------------------


def _crc_table() -> tuple[int, ...]:
    # Reflected polynomial 0x8408: the table entry for a byte is that byte run
    # through eight shift/xor steps, so the per-byte loop below is one lookup.
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16_x25(data: bytes | bytearray | memoryview) -> int:
    """CRC-16/X-25 of ``data`` (init 0xFFFF, reflected, final XOR 0xFFFF).

    GT06 computes it over LEN through SERIAL and sends it big-endian.
    """
    crc = 0xFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc ^ 0xFFFF


# --- wire declarations ----------------------------------------------------------------

START_SHORT = b"\x78\x78"
START_LONG = b"\x79\x79"
STOP = b"\r\n"
_START_MARKER = re.compile(re.escape(START_SHORT) + b"|" + re.escape(START_LONG))

MAX_NOISE = 4096
"""Bytes discarded without one good frame after which the stream is declared hopeless."""


class PROTO:
    """Protocol numbers this module knows (terminal -> server unless noted)."""

    LOGIN = 0x01
    LBS_EXTENSION = 0x11
    LOCATION = 0x12
    STATUS = 0x13
    STRING_REPLY = 0x15
    ALARM = 0x16
    LBS_ALARM = 0x19
    STRING_INFO = 0x21
    LOCATION_UTC = 0x22
    ALARM_UTC = 0x26
    ALARM_FENCES = 0x27
    LBS_MULTI = 0x28
    LOCATION_4G = 0xA0
    ONLINE_COMMAND = 0x80  # server -> terminal


ACKED_PROTOCOLS = frozenset(
    {
        PROTO.LOGIN,
        PROTO.STATUS,
        PROTO.ALARM,
        PROTO.LBS_ALARM,
        PROTO.ALARM_UTC,
        PROTO.ALARM_FENCES,
    }
)
"""Messages the terminal waits for an echo of; locations and string replies get none."""

# LEN counts PROTO + content + SERIAL + CRC; the body is what the CRC covers.
BODY_SHORT = Struct(
    "length" / Rebuild(Int8ub, len_(this.content) + 5),
    "proto" / Int8ub,
    "content" / Bytes(this.length - 5),
    "serial" / Int16ub,
)
BODY_LONG = Struct(
    "length" / Rebuild(Int16ub, len_(this.content) + 5),
    "proto" / Int8ub,
    "content" / Bytes(this.length - 5),
    "serial" / Int16ub,
)
FRAME_SHORT = Struct(
    "start" / Const(START_SHORT),
    "body" / RawCopy(BODY_SHORT),
    "crc" / Checksum(Int16ub, crc16_x25, this.body.data),
    "stop" / Const(STOP),
)
FRAME_LONG = Struct(
    "start" / Const(START_LONG),
    "body" / RawCopy(BODY_LONG),
    "crc" / Checksum(Int16ub, crc16_x25, this.body.data),
    "stop" / Const(STOP),
)


class _BcdImei(Adapter):
    """8 BCD bytes <-> 15-digit IMEI (the leading nibble is padding)."""

    def _decode(self, obj: bytes, context: Any, path: str) -> str:
        digits = obj.hex()
        if not digits.isdigit():
            raise ValidationError(f"IMEI is not BCD: {digits}", path=path)
        return digits[1:]

    def _encode(self, obj: str, context: Any, path: str) -> bytes:
        if len(obj) != 15 or not obj.isdigit():
            raise ValidationError(f"IMEI must be 15 digits: {obj!r}", path=path)
        return bytes.fromhex("0" + obj)


TZ_LANGUAGE = BitStruct(
    "offset_hhmm" / BitsInteger(12),  # hours * 100 + minutes
    "west" / Flag,
    "reserved" / BitsInteger(1),
    "language" / BitsInteger(2),
)
LOGIN_BASIC = Struct("imei" / _BcdImei(Bytes(8)))
LOGIN_EXTENDED = Struct(
    "imei" / _BcdImei(Bytes(8)),
    "type_id" / Int16ub,
    "tz_language" / TZ_LANGUAGE,
    "extra" / GreedyBytes,
)

DATETIME = Struct(
    "year" / Int8ub,  # years since 2000, UTC
    "month" / Int8ub,
    "day" / Int8ub,
    "hour" / Int8ub,
    "minute" / Int8ub,
    "second" / Int8ub,
)
COURSE_STATUS = BitStruct(
    "reserved" / BitsInteger(2),
    "differential" / Flag,
    "positioned" / Flag,  # bit 12: the fix is valid
    "west" / Flag,  # bit 11
    "north" / Flag,  # bit 10
    "course" / BitsInteger(10),
)
GPS_BLOCK = Struct(
    "time" / DATETIME,
    "info" / BitStruct("length" / Nibble, "satellites" / Nibble),
    "lat" / Int32ub,  # 1/1,800,000 degree
    "lon" / Int32ub,
    "speed" / Int8ub,  # km/h
    "course_status" / COURSE_STATUS,
)

# MCC bit 15 announces a 2-byte MNC (newer firmware); the rest is the MCC.
CELL_2G = Struct(
    "mcc" / Int16ub,
    "mnc" / IfThenElse(this.mcc & 0x8000, Int16ub, Int8ub),
    "lac" / Int16ub,
    "cell_id" / Int24ub,
)
# The alarm layout with one byte more than standard: either a 2-byte MNC or a 4-byte cell id.
CELL_WIDE = Struct(
    "mcc" / Int16ub,
    "mnc" / IfThenElse(this.mcc & 0x8000, Int16ub, Int8ub),
    "lac" / Int16ub,
    "cell_id" / IfThenElse(this.mcc & 0x8000, Int24ub, Int32ub),
)
CELL_4G = Struct(
    "mcc" / Int16ub,
    "mnc" / IfThenElse(this.mcc & 0x8000, Int16ub, Int8ub),
    "lac" / Int32ub,
    "cell_id" / Int64ub,
)
LBS_PLAIN = Struct("cell" / CELL_2G)
LBS_WITH_LENGTH = Struct("lbs_length" / Int8ub, "cell" / CELL_2G)
LBS_WIDE = Struct("lbs_length" / Int8ub, "cell" / CELL_WIDE)

TERMINAL_INFO = BitStruct(
    "oil_cut" / Flag,
    "gps_fixed" / Flag,
    "alarm" / BitsInteger(3),  # 100 SOS, 011 low battery, 010 power cut, 001 vibration
    "charging" / Flag,
    "acc" / Flag,
    "armed" / Flag,
)
STATUS_BLOCK = Struct(
    "info" / TERMINAL_INFO,
    "voltage_level" / Int8ub,  # 0-6, a battery level rather than volts
    "gsm_signal" / Int8ub,  # 0-4
    "alarm" / Int8ub,
    "language" / Int8ub,
)
# 0x13 carries the status block itself; some firmwares add bytes, some stop after GSM.
HEARTBEAT_STATUS = Struct(*STATUS_BLOCK.subcons, "extra" / GreedyBytes)
HEARTBEAT_STATUS_SHORT = Struct(*STATUS_BLOCK.subcons[:3], "extra" / GreedyBytes)

LOCATION_12 = Struct("gps" / GPS_BLOCK, "cell" / CELL_2G, "extra" / GreedyBytes)
LOCATION_22 = Struct(
    "gps" / GPS_BLOCK,
    "cell" / CELL_2G,
    "acc" / Int8ub,
    "upload_mode" / Int8ub,
    "reupload" / Int8ub,
    "extra" / GreedyBytes,  # mileage on some models
)
LOCATION_A0 = Struct(
    "gps" / GPS_BLOCK,
    "cell" / CELL_4G,
    "acc" / Int8ub,
    "upload_mode" / Int8ub,
    "reupload" / Int8ub,
    "extra" / GreedyBytes,
)
LBS_MULTI = Struct(
    "time" / DATETIME,
    "mcc" / Int16ub,
    "mnc" / IfThenElse(this.mcc & 0x8000, Int16ub, Int8ub),
    "cells" / Struct("lac" / Int16ub, "cell_id" / Int24ub, "rssi" / Int8ub)[7],
    "timing_advance" / Int8ub,
    "language" / Int16ub,
    "extra" / GreedyBytes,
)

# 0x80 (server command) and 0x15 (terminal's old-style answer) share this content;
# the 0x15 trailer is the 2-byte language, our 0x80 sends none (as the vendor example).
COMMAND_TEXT = Struct(
    "length" / Rebuild(Int8ub, len_(this.text) + 4),
    "server_flag" / Int32ub,
    "text" / Bytes(this.length - 4),
    "trailer" / GreedyBytes,
)
STRING_INFO = Struct(
    "server_flag" / Int32ub,
    "encoding" / Int8ub,  # 1 ASCII, 2 UTF-16BE
    "text" / GreedyBytes,
)


def alarm_struct(lbs: Construct, fence: bool) -> Struct:
    """Alarm content layout (0x16/0x26/0x27/0x19 family) for one LBS variant.

    ``0x19`` (LBS alarm) is the same without the GPS block: :data:`LBS_ALARM_STRUCTS`.
    """
    fields: list[Any] = ["gps" / GPS_BLOCK, "lbs" / lbs, "status" / STATUS_BLOCK]
    if fence:
        fields.append("fence" / Int8ub)
    fields.append("extra" / GreedyBytes)
    return Struct(*fields)


_LBS_VARIANTS: dict[int, Construct] = {8: LBS_PLAIN, 9: LBS_WITH_LENGTH, 10: LBS_WIDE}

ALARM_STRUCTS: dict[tuple[int, bool], Struct] = {
    (size, fence): alarm_struct(lbs, fence)
    for size, lbs in _LBS_VARIANTS.items()
    for fence in (False, True)
}
"""Alarm layouts keyed by (LBS section size 8/9/10, has fence byte)."""

LBS_ALARM_STRUCTS: dict[int, Struct] = {
    size: Struct("lbs" / lbs, "status" / STATUS_BLOCK) for size, lbs in _LBS_VARIANTS.items()
}
"""0x19 (alarm without GPS) layouts keyed by LBS section size."""

# Compiled parsers for the hot path; building uses the declarations above.
_P_BODY_SHORT = BODY_SHORT.compile()
_P_BODY_LONG = BODY_LONG.compile()
_P_LOGIN_BASIC = LOGIN_BASIC.compile()
_P_LOGIN_EXTENDED = LOGIN_EXTENDED.compile()
_P_HEARTBEAT = HEARTBEAT_STATUS.compile()
_P_HEARTBEAT_SHORT = HEARTBEAT_STATUS_SHORT.compile()
_P_LOCATION = {
    PROTO.LOCATION: LOCATION_12.compile(),
    PROTO.LOCATION_UTC: LOCATION_22.compile(),
    PROTO.LOCATION_4G: LOCATION_A0.compile(),
}
_P_ALARM = {key: layout.compile() for key, layout in ALARM_STRUCTS.items()}
_P_LBS_ALARM = {size: layout.compile() for size, layout in LBS_ALARM_STRUCTS.items()}
_P_LBS_MULTI = LBS_MULTI.compile()
_P_GPS = GPS_BLOCK.compile()
_P_STATUS = STATUS_BLOCK.compile()
_P_COMMAND_TEXT = COMMAND_TEXT.compile()
_P_STRING_INFO = STRING_INFO.compile()

_GPS_SIZE = GPS_BLOCK.sizeof()
_STATUS_SIZE = STATUS_BLOCK.sizeof()
_MIN_CONTENT = {
    PROTO.LOCATION: _GPS_SIZE + 8,
    PROTO.LOCATION_UTC: _GPS_SIZE + 11,
    PROTO.LOCATION_4G: _GPS_SIZE + 17,
}


# --- field semantics ------------------------------------------------------------------

VOLTAGE_LEVEL_PERCENT = (0, 5, 10, 25, 50, 75, 100)
"""Battery percent for voltage levels 0-6 (empty ... full)."""

_INFO_ALARM_SOS = 0b100
_INFO_ALARMS = {
    0b001: "vibration",
    0b010: "power_cut",
    0b011: "low_battery",
    0b110: "geofence",
    0b111: "tamper",  # "removal" on some firmwares
}

ALARM_CODE_SOS = 0x01
ALARM_CODE_FALL = 0x23
ALARM_CODES = {
    0x02: "power_cut",
    0x03: "vibration",
    0x04: "geofence_enter",
    0x05: "geofence_exit",
    0x06: "overspeed",
    0x09: "tow",
    0x0A: "gps_blind_enter",
    0x0B: "gps_blind_exit",
    0x0C: "power_on",
    0x0D: "gps_first_fix",
    0x0E: "low_external_battery",
    0x0F: "external_battery_protection",
    0x10: "sim_changed",
    0x11: "power_off",
    0x12: "airplane_mode",
    0x13: "tamper",
    0x14: "door",
    0x15: "power_off_low_battery",
    0x16: "sound",
    0x17: "fake_base_station",
    0x18: "cover_open",
    0x19: "low_battery",
    0x20: "deep_sleep",
    0x29: "harsh_acceleration",
    0x2A: "sharp_left_turn",
    0x2B: "sharp_right_turn",
    0x2C: "collision",
    0x30: "harsh_braking",
    0x32: "unplugged",
    0xFE: "acc_on",
    0xFF: "acc_off",
}
"""Alarm byte -> DeviceAlarm label (0x01 SOS and 0x23 fall become Sos instead)."""


def _battery(level: int) -> int | None:
    # Clones put other things here (percent, raw volts); an unknown value is better
    # reported as unknown than guessed.
    return VOLTAGE_LEVEL_PERCENT[level] if 0 <= level <= 6 else None


def _signal(level: int) -> int | None:
    return level * 25 if 0 <= level <= 4 else None


def _location(gps: Any) -> Location | None:
    status = gps.course_status
    if not status.positioned:
        return None
    lat = gps.lat / 1_800_000
    lon = gps.lon / 1_800_000
    if lat > 90 or lon > 180:
        return None
    return Location(
        lat=lat if status.north else -lat,
        lon=-lon if status.west else lon,
        source="gps",
    )


def _epoch(t: Any) -> float | None:
    if not 1 <= t.month <= 12 or not 1 <= t.day <= 31:
        return None
    try:
        return float(calendar.timegm((2000 + t.year, t.month, t.day, t.hour, t.minute, t.second)))
    except (ValueError, OverflowError):
        return None


# --- framing --------------------------------------------------------------------------


class RawFrame(NamedTuple):
    """One whole frame whose stop bytes and CRC checked out."""

    proto: int
    content: bytes
    serial: int
    long: bool = False


class Gt06Ctx(NamedTuple):
    """What a reply needs from the inbound frame: protocol number, serial, framing."""

    proto: int
    serial: int
    long: bool = False


def build_frame(proto: int, content: bytes, serial: int, long: bool = False) -> bytes:
    """One complete frame (start, LEN, PROTO, content, SERIAL, CRC, stop).

    Raises ValueError if ``content`` does not fit the chosen framing.
    """
    limit = 0xFFFF if long else 0xFF
    if len(content) + 5 > limit:
        raise ValueError(f"content of {len(content)} bytes does not fit a GT06 frame")
    frame_struct = FRAME_LONG if long else FRAME_SHORT
    body = {"value": {"proto": proto, "content": content, "serial": serial & 0xFFFF}}
    return frame_struct.build({"body": body})


def build_ack(proto: int, serial: int, long: bool = False) -> bytes:
    """The empty-content echo GT06 uses as an acknowledgement: ``78 78 05 PP SS SS CRC 0D 0A``."""
    return build_frame(proto, b"", serial, long)


def build_online_command(text: str, server_flag: int, serial: int) -> bytes:
    """A ``0x80`` online command carrying ASCII ``text`` (an SMS-style command)."""
    content = COMMAND_TEXT.build(
        {"server_flag": server_flag & 0xFFFFFFFF, "text": text.encode("ascii"), "trailer": b""}
    )
    return build_frame(PROTO.ONLINE_COMMAND, content, serial)


_PHONE_CHARS = re.compile(r"[^0-9+]")


def settings_texts(settings: Settings) -> list[str]:
    """SMS-style command texts for ``settings``: ``HBT,<min>#`` then ``SOS,A,<n1>,<n2>,<n3>#``.

    Concox firmware sets the 0x13 heartbeat interval with ``HBT`` in whole minutes
    (``TIMER`` is the GPS upload interval, which is not what we mean).

    Only three SOS numbers fit the command; characters other than digits and ``+``
    are dropped because ``,`` and ``#`` are the command syntax.
    """
    texts = [f"HBT,{max(1, round(settings.heartbeat_interval_s / 60))}#"]
    numbers = [_PHONE_CHARS.sub("", n) for n in settings.contact_numbers]
    numbers = [n for n in numbers if n][:3]
    if numbers:
        texts.append("SOS,A," + ",".join(numbers) + "#")
    return texts


class Gt06FrameReader:
    """Reassembles GT06 frames from a byte stream and resynchronises after garbage.

    ``feed`` never raises; it returns whole frames and :class:`DecodeError`
    reports (``noise``, ``bad_length``, ``bad_stop``, ``bad_crc``) in stream
    order.  After :data:`MAX_NOISE` discarded bytes without a good frame it
    reports a fatal ``noise`` error once and ignores everything after it.
    """

    def __init__(self, max_frame: int = 1024) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._discarded = 0  # bytes thrown away since the last good frame
        self._in_run = False  # the bytes now being skipped were already reported
        self._dead = False

    def feed(self, data: bytes) -> list[RawFrame | DecodeError]:
        """Consume ``data``; return every complete frame or error, in stream order."""
        if self._dead:
            return []
        out: list[RawFrame | DecodeError] = []
        self._buf += data
        try:
            self._scan(out)
        except Exception as exc:  # the contract is to never raise, whatever arrives
            self._die(out, f"internal error: {exc!r}")
        return out

    # Work by offset and trim the buffer once per feed: deleting each frame from the
    # front would make a large feed quadratic.
    def _scan(self, out: list[RawFrame | DecodeError]) -> None:
        buf = self._buf
        pos = 0
        try:
            while pos < len(buf):
                start = self._find_start(buf, pos)
                if start < 0:
                    # A trailing 0x78/0x79 may be the first half of a marker still in flight.
                    end = len(buf) - (1 if buf[-1] in (0x78, 0x79) else 0)
                    self._discard(end - pos, out)
                    pos = end
                    return
                if not self._discard(start - pos, out):
                    return
                pos = start
                # A start marker ends the current run of skipped bytes.
                self._in_run = False
                status, frame_len = self._check(buf, pos)
                if status == "incomplete":
                    later = self._later_frame(buf, pos)
                    if later is None:
                        return
                    self._framing_error("bad_length", "length runs past a later valid frame", out)
                    if not self._discard(later - pos, out):
                        return
                    pos = later
                    continue
                if status != "ok":
                    self._framing_error(status, "", out)
                    if not self._discard(2, out):
                        return
                    pos += 2
                    continue
                frame = bytes(buf[pos : pos + frame_len])
                pos += frame_len
                self._discarded = 0
                out.append(self._split(frame))
        finally:
            if not self._dead:
                del buf[:pos]

    @staticmethod
    def _find_start(buf: bytearray, pos: int) -> int:
        # One regex scan stops at the first marker of either kind; two find() calls
        # would each run to the end of the buffer when that marker kind is absent.
        match = _START_MARKER.search(buf, pos)
        return match.start() if match else -1

    def _check(self, buf: bytearray, pos: int) -> tuple[str, int]:
        """Classify the candidate frame at ``pos``: ok / incomplete / bad_* and its size."""
        long = buf[pos] == 0x79
        header = 4 if long else 3
        if len(buf) - pos < header:
            return "incomplete", 0
        length = (buf[pos + 2] << 8) | buf[pos + 3] if long else buf[pos + 2]
        frame_len = length + header + 2
        if length < 5 or frame_len > self.max_frame:
            return "bad_length", frame_len
        if len(buf) - pos < frame_len:
            return "incomplete", frame_len
        end = pos + frame_len
        if buf[end - 2 : end] != STOP:
            return "bad_stop", frame_len
        crc = (buf[end - 4] << 8) | buf[end - 3]
        if crc16_x25(memoryview(buf)[pos + 2 : end - 4]) != crc:
            return "bad_crc", frame_len
        return "ok", frame_len

    def _later_frame(self, buf: bytearray, pos: int) -> int | None:
        # A lying LEN would otherwise hold back every frame behind it (an SOS among
        # them) until max_frame bytes arrived.  If a complete, CRC-valid frame starts
        # inside the span the candidate claims, the candidate's length is the lie.
        later = self._find_start(buf, pos + 2)
        while later >= 0:
            status, _ = self._check(buf, later)
            if status == "ok":
                return later
            later = self._find_start(buf, later + 1)
        return None

    def _framing_error(self, reason: str, detail: str, out: list[RawFrame | DecodeError]) -> None:
        out.append(DecodeError(reason, detail=detail))
        # The rest of the broken frame is skipped under this report, not as noise.
        self._in_run = True

    def _discard(self, count: int, out: list[RawFrame | DecodeError]) -> bool:
        """Account for ``count`` skipped bytes; False once the noise budget is exhausted."""
        if count <= 0:
            return True
        if not self._in_run:
            out.append(DecodeError("noise", detail="skipping to the next start marker"))
            self._in_run = True
        self._discarded += count
        if self._discarded > MAX_NOISE:
            self._die(out, f"{self._discarded} bytes without a valid frame")
            return False
        return True

    def _die(self, out: list[RawFrame | DecodeError], detail: str) -> None:
        out.append(DecodeError("noise", fatal=True, detail=detail))
        self._buf.clear()
        self._dead = True

    @staticmethod
    def _split(frame: bytes) -> RawFrame:
        long = frame[0] == 0x79
        parser = _P_BODY_LONG if long else _P_BODY_SHORT
        body = parser.parse(frame[2:-4])
        return RawFrame(body.proto, body.content, body.serial, long)


# --- the server-side codec ------------------------------------------------------------

_CARE_REPLY = re.compile(r"^\s*CARE,(\d+),(OK|HELP)#?\s*$", re.IGNORECASE)


class _Malformed(Exception):
    """Content too short or inconsistent for its message type."""


# Compiled parsers report short input as struct.error rather than a ConstructError.
_PARSE_ERRORS = (ConstructError, struct.error)


class Gt06Codec:
    """Server side of one GT06 TCP connection (a :class:`StreamCodec`)."""

    protocol = "gt06"

    def __init__(self, max_frame: int = 1024) -> None:
        self._reader = Gt06FrameReader(max_frame)
        self._imei = ""
        self._decoders = {
            PROTO.LOGIN: self._login,
            PROTO.STATUS: self._status,
            PROTO.LOCATION: self._gps_location,
            PROTO.LOCATION_UTC: self._gps_location,
            PROTO.LOCATION_4G: self._gps_location,
            PROTO.ALARM: self._alarm,
            PROTO.ALARM_UTC: self._alarm,
            PROTO.ALARM_FENCES: self._alarm,
            PROTO.LBS_ALARM: self._lbs_alarm,
            PROTO.LBS_MULTI: self._lbs_multi,
            PROTO.LBS_EXTENSION: self._liveness,
            PROTO.STRING_REPLY: self._string_reply,
            PROTO.STRING_INFO: self._string_info,
        }

    @property
    def ident(self) -> str:
        """IMEI from the last login decoded on this connection ("" before any)."""
        return self._imei

    def feed(self, data: bytes) -> list[Inbound | DecodeError]:
        """Consume received bytes; return every complete frame's result in order."""
        results: list[Inbound | DecodeError] = []
        for item in self._reader.feed(data):
            if isinstance(item, DecodeError):
                results.append(item)
            else:
                results.append(self._decode(item))
        return results

    def reply(self, inbound: Inbound, outcome: Outcome) -> bytes | None:
        """The echo ack for logins, status and alarms once accepted; otherwise None.

        A refused login gets no answer (GT06 servers stay silent to unknown IMEIs)
        and a refused alarm none either, so the terminal sends it again.
        """
        ctx = inbound.ctx
        if not isinstance(ctx, Gt06Ctx) or not outcome.ok:
            return None
        if ctx.proto not in ACKED_PROTOCOLS:
            return None
        return build_ack(ctx.proto, ctx.serial, ctx.long)

    def command(self, ident: str, command: Command, seq: int) -> bytes | None:
        """``0x80`` frame(s) for ``command``; the server flag (echoed in the answer) is ``seq``."""
        if isinstance(command, CarePrompt):
            texts = [f"CARE,{command.round_id}#"]
        elif isinstance(command, Settings):
            texts = settings_texts(command)
        else:
            return None
        try:
            return b"".join(build_online_command(t, seq, seq) for t in texts)
        except (ValueError, ConstructError):
            return None

    # --- per-frame decoding ---

    def _decode(self, frame: RawFrame) -> Inbound | DecodeError:
        decoder = self._decoders.get(frame.proto)
        if decoder is None:
            return DecodeError("unknown_type", detail=f"protocol 0x{frame.proto:02x}")
        ctx = Gt06Ctx(frame.proto, frame.serial, frame.long)
        try:
            event = decoder(frame)
        except Exception as exc:  # whatever the content does to a parser, it is malformed
            return DecodeError("malformed", detail=f"protocol 0x{frame.proto:02x}: {exc!r}")
        return Inbound(event, ctx)

    def _login(self, frame: RawFrame) -> TerminalEvent:
        content = frame.content
        if len(content) >= 12:
            parsed = _P_LOGIN_EXTENDED.parse(content)
        elif len(content) >= 8:
            # 8 bytes is the original GT06; 10 (type id, no time zone) is seen too.
            parsed = _P_LOGIN_BASIC.parse(content[:8])
        else:
            raise _Malformed(f"login content of {len(content)} bytes")
        self._imei = parsed.imei
        return Login(ident=parsed.imei, protocol_version=1)

    def _status(self, frame: RawFrame) -> TerminalEvent:
        content = frame.content
        if len(content) >= 5:
            status = _P_HEARTBEAT.parse(content)
        elif len(content) >= 3:
            status = _P_HEARTBEAT_SHORT.parse(content)
        else:
            raise _Malformed(f"status content of {len(content)} bytes")
        battery = _battery(status.voltage_level)
        if status.info.alarm == _INFO_ALARM_SOS:
            return Sos(
                ident=self._imei, seq=frame.serial, trigger=SosTrigger.BUTTON, battery=battery
            )
        return Heartbeat(
            ident=self._imei,
            battery=battery,
            charging=status.info.charging,
            signal=_signal(status.gsm_signal),
        )

    def _gps_location(self, frame: RawFrame) -> TerminalEvent:
        if len(frame.content) < _MIN_CONTENT[frame.proto]:
            raise _Malformed(f"location content of {len(frame.content)} bytes")
        parsed = _P_LOCATION[frame.proto].parse(frame.content)
        location = _location(parsed.gps)
        if location is None:
            # No fix: nothing to plot, but the terminal is evidently alive.
            return Heartbeat(ident=self._imei)
        return LocationReport(ident=self._imei, location=location)

    def _alarm(self, frame: RawFrame) -> TerminalEvent:
        content = frame.content
        fence = frame.proto == PROTO.ALARM_FENCES
        lbs_size = len(content) - _GPS_SIZE - _STATUS_SIZE - (1 if fence else 0)
        if lbs_size < 8:
            raise _Malformed(f"alarm content of {len(content)} bytes")
        # 8: no LBS length byte (LEN 0x24); 9: standard (0x25); 10: 4-byte cell id or
        # 2-byte MNC (0x26).  Longer contents carry mileage etc. after the status block.
        layout = lbs_size if lbs_size <= 10 else 9
        try:
            parsed = _P_ALARM[(layout, fence)].parse(content)
            aligned = len(parsed.extra) == lbs_size - layout
        except _PARSE_ERRORS:
            aligned = False
        if aligned:
            gps, status = parsed.gps, parsed.status
        else:
            # A cell layout the length did not predict (MCC bit 15 where no 2-byte MNC
            # fits).  The status block still sits where the length says, and it holds
            # the alarm: never lose an SOS over a cell tower we do not even use.
            gps = _P_GPS.parse(content)
            status = _P_STATUS.parse(content[_GPS_SIZE + layout :])
        return self._alarm_event(frame, status, _location(gps), _epoch(gps.time))

    def _lbs_alarm(self, frame: RawFrame) -> TerminalEvent:
        content = frame.content
        lbs_size = len(content) - _STATUS_SIZE
        if lbs_size not in _P_LBS_ALARM:
            raise _Malformed(f"LBS alarm content of {len(content)} bytes")
        try:
            status = _P_LBS_ALARM[lbs_size].parse(content).status
        except _PARSE_ERRORS:
            status = _P_STATUS.parse(content[lbs_size:])  # same reasoning as in _alarm
        return self._alarm_event(frame, status, None, None)

    def _alarm_event(
        self,
        frame: RawFrame,
        status: Any,
        location: Location | None,
        terminal_time: float | None,
    ) -> TerminalEvent:
        code = status.alarm
        bits = status.info.alarm
        battery = _battery(status.voltage_level)
        trigger: SosTrigger | None = None
        if code == ALARM_CODE_FALL:
            trigger = SosTrigger.FALL
        elif code == ALARM_CODE_SOS or bits == _INFO_ALARM_SOS:
            trigger = SosTrigger.BUTTON
        if trigger is not None:
            return Sos(
                ident=self._imei,
                seq=frame.serial,
                trigger=trigger,
                location=location,
                terminal_time=terminal_time,
                battery=battery,
            )
        if code:
            return DeviceAlarm(
                ident=self._imei,
                alarm=ALARM_CODES.get(code, f"code_0x{code:02x}"),
                location=location,
            )
        if bits:
            return DeviceAlarm(ident=self._imei, alarm=_INFO_ALARMS[bits], location=location)
        # An alarm-type frame with no alarm in it is a status report.
        return Heartbeat(
            ident=self._imei,
            battery=battery,
            charging=status.info.charging,
            signal=_signal(status.gsm_signal),
            location=location,
        )

    def _lbs_multi(self, frame: RawFrame) -> TerminalEvent:
        _P_LBS_MULTI.parse(frame.content)
        # Cell towers alone give no position we can use; the frame proves liveness.
        return Heartbeat(ident=self._imei)

    def _liveness(self, frame: RawFrame) -> TerminalEvent:
        # 0x11 means different things to different firmwares; only liveness is certain.
        return Heartbeat(ident=self._imei)

    def _string_reply(self, frame: RawFrame) -> TerminalEvent:
        parsed = _P_COMMAND_TEXT.parse(frame.content)
        if parsed.length < 4:
            raise _Malformed("string reply shorter than its server flag")
        return self._text_event(parsed.server_flag, parsed.text.decode("ascii", "replace"))

    def _string_info(self, frame: RawFrame) -> TerminalEvent:
        parsed = _P_STRING_INFO.parse(frame.content)
        codec = "utf-16-be" if parsed.encoding == 2 else "ascii"
        return self._text_event(parsed.server_flag, parsed.text.decode(codec, "replace"))

    def _text_event(self, server_flag: int, text: str) -> TerminalEvent:
        care = _CARE_REPLY.match(text)
        if care:
            answer = CareAnswer.OK if care.group(2).upper() == "OK" else CareAnswer.HELP
            return CareCheckAnswer(ident=self._imei, round_id=int(care.group(1)), answer=answer)
        return CommandAck(ident=self._imei, ref_seq=server_flag, ok=True)
