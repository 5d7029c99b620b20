"""JT/T 808 (2013 and 2019 editions): bytes <-> protocol-neutral events.

Three layers, as in the mature decoders we learned from:

* wire declarations (``construct``), written once and used to parse *and* to build — the
  terminal simulator builds its frames from the same declarations;
* :class:`FrameSplitter`: stream reassembly between ``0x7E`` delimiters, unescaping, check
  code and length checks, resynchronisation;
* :class:`Jt808Codec`: one per TCP connection; frames -> :class:`Inbound` events, and the
  gateway's decisions -> ``0x8001`` / ``0x8100`` / ``0x8103`` / ``0x8300`` frames.

The per-frame hot path uses only compiled declarations; the XOR check and the escaping are
done by hand because construct's ``Checksum``/``RawCopy`` have no compiled form.
See ``docs/protocol-jt808.md`` for the choices made here (ident, battery item, fall bits,
alarm acknowledgement).
"""

from __future__ import annotations

import datetime as dt
import functools
import operator
from dataclasses import dataclass, replace

from construct import (
    Array,
    BitsInteger,
    Bitwise,
    Bytes,
    ConstructError,
    Container,
    Flag,
    GreedyBytes,
    GreedyRange,
    If,
    Int8ub,
    Int16ub,
    Int32ub,
    Prefixed,
    Rebuild,
    Struct,
    len_,
    this,
)

from dispatch.events import (
    CarePrompt,
    Command,
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
    TerminalEvent,
)
from dispatch.protocol.base import DecodeError, Inbound, Outcome

# --- constants --------------------------------------------------------------------------

EDITION_2013 = 2013
EDITION_2019 = 2019

FLAG = 0x7E
ESC = 0x7D

MSG_TERMINAL_RESPONSE = 0x0001
MSG_HEARTBEAT = 0x0002
MSG_LOGOUT = 0x0003
MSG_REGISTER = 0x0100
MSG_AUTHENTICATE = 0x0102
MSG_LOCATION = 0x0200
MSG_LOCATION_BATCH = 0x0704
MSG_PLATFORM_RESPONSE = 0x8001
MSG_REGISTER_RESPONSE = 0x8100
MSG_SET_PARAMS = 0x8103
MSG_TEXT = 0x8300

# 0x0001 / 0x8001 result byte.
RESULT_OK = 0
RESULT_FAIL = 1
RESULT_MESSAGE_ERROR = 2
RESULT_UNSUPPORTED = 3
RESULT_ALARM_CONFIRMED = 4

# 0x8100 result byte.
REGISTER_OK = 0
REGISTER_NO_SUCH_TERMINAL = 4

# 0x0200 alarm flag bits.
ALARM_EMERGENCY = 1 << 0
ALARM_COLLISION = 1 << 29
ALARM_ROLLOVER = 1 << 30
# We read a body-worn terminal's impact/tip-over warning as a fall; see the protocol doc.
ALARM_FALL_BITS = ALARM_COLLISION | ALARM_ROLLOVER

# 0x0200 status bits.
STATUS_FIXED = 1 << 1
STATUS_SOUTH = 1 << 2
STATUS_WEST = 1 << 3

# 0x0200 additional item ids.
ITEM_MILEAGE = 0x01
ITEM_SIGNAL = 0x30
ITEM_SATELLITES = 0x31
ITEM_BATTERY = 0xE1  # vendor item, one byte of percent (the id traccar's decoder reads)

# 0x8103 parameter ids.
PARAM_HEARTBEAT_INTERVAL = 0x0001
PARAM_MONITOR_PHONE = 0x0040

# 0x8300 flag bits and the 2019 text type.
TEXT_FLAG_DISPLAY = 1 << 2
TEXT_FLAG_TTS = 1 << 3
TEXT_TYPE_NOTICE = 1

CARE_PROMPT_TEXT = "您好，请按键确认平安（{round_id}）"

MAX_BODY = 0x3FF  # ten bits of body length
_SIGNAL_MAX = 31  # 3GPP CSQ scale; 99 means "unknown"
_GMT8 = dt.timezone(dt.timedelta(hours=8))
_MIN_FRAME = 13  # 2013 header (12) + check (1), unescaped
_MAX_PENDING_GROUPS = 4
_MAX_PENDING_BYTES = 64 * 1024

# --- wire declarations ------------------------------------------------------------------

# A BitStruct, spelled Bitwise(Struct(...)) so the bit fields can be compiled: construct
# cannot compile the Bitwise wrapper itself, and the interpreted form costs twice as much.
BodyAttributes = Bitwise(
    Struct(
        "reserved" / Flag,  # bit 15
        "versioned" / Flag,  # bit 14: 1 = 2019 header
        "subpacket" / Flag,  # bit 13: total/index words follow the header
        "encryption" / BitsInteger(3),  # bits 10-12: 0 = plain, bit 10 = RSA
        "length" / BitsInteger(10),  # bits 0-9: body length in bytes
    ).compile()
)

PacketInfo = Struct("total" / Int16ub, "index" / Int16ub)

Header2013 = Struct(
    "msg_id" / Int16ub,
    "attr" / BodyAttributes,
    "phone" / Bytes(6),
    "serial" / Int16ub,
    "packet" / If(this.attr.subpacket, PacketInfo),
)

Header2019 = Struct(
    "msg_id" / Int16ub,
    "attr" / BodyAttributes,
    "version" / Int8ub,
    "phone" / Bytes(10),
    "serial" / Int16ub,
    "packet" / If(this.attr.subpacket, PacketInfo),
)

# 0x0001 (terminal) and 0x8001 (platform) general response share one layout.
GeneralResponse = Struct("reply_serial" / Int16ub, "reply_id" / Int16ub, "result" / Int8ub)

AdditionalItem = Struct("id" / Int8ub, "value" / Prefixed(Int8ub, GreedyBytes))

LocationBody = Struct(
    "alarm" / Int32ub,
    "status" / Int32ub,
    "lat" / Int32ub,  # 1e-6 degree, sign in status bit 2
    "lon" / Int32ub,  # 1e-6 degree, sign in status bit 3
    "altitude" / Int16ub,
    "speed" / Int16ub,  # 0.1 km/h
    "direction" / Int16ub,
    "time" / Bytes(6),  # BCD YYMMDDhhmmss, GMT+8
    # GreedyRange has no compiled form; compiling the item inside it still cuts the cost 4x.
    "additional" / GreedyRange(AdditionalItem.compile()),
)

LocationBatchBody = Struct(
    "count" / Rebuild(Int16ub, len_(this.locations)),
    "type" / Int8ub,  # 0 normal batch, 1 blind-area backfill
    "locations" / Array(this.count, Prefixed(Int16ub, LocationBody)),
)

# Registration before 2013 (model 8 bytes); real terminals still send it.
Registration2011 = Struct(
    "province" / Int16ub,
    "city" / Int16ub,
    "maker" / Bytes(5),
    "model" / Bytes(8),
    "terminal_id" / Bytes(7),
    "plate_color" / Int8ub,
    "plate" / GreedyBytes,
)

Registration2013 = Struct(
    "province" / Int16ub,
    "city" / Int16ub,
    "maker" / Bytes(5),
    "model" / Bytes(20),
    "terminal_id" / Bytes(7),
    "plate_color" / Int8ub,
    "plate" / GreedyBytes,  # GBK
)

Registration2019 = Struct(
    "province" / Int16ub,
    "city" / Int16ub,
    "maker" / Bytes(11),
    "model" / Bytes(30),
    "terminal_id" / Bytes(30),
    "plate_color" / Int8ub,
    "plate" / GreedyBytes,  # GBK
)

Authentication2013 = Struct("code" / GreedyBytes)

Authentication2019 = Struct(
    "code" / Prefixed(Int8ub, GreedyBytes),
    "imei" / Bytes(15),
    "software" / Bytes(20),
)

RegistrationResponse = Struct(
    "reply_serial" / Int16ub,
    "result" / Int8ub,
    "auth_code" / GreedyBytes,  # only on success
)

ParamItem = Struct("id" / Int32ub, "value" / Prefixed(Int8ub, GreedyBytes))

SetParamsBody = Struct(
    "count" / Rebuild(Int8ub, len_(this.params)),
    "params" / Array(this.count, ParamItem),
)

TextMessage2013 = Struct("flag" / Int8ub, "text" / GreedyBytes)  # GBK text

TextMessage2019 = Struct("flag" / Int8ub, "text_type" / Int8ub, "text" / GreedyBytes)

_HEADER_2013 = Header2013.compile()
_HEADER_2019 = Header2019.compile()
_GENERAL_RESPONSE = GeneralResponse.compile()
_LOCATION = LocationBody.compile()
_LOCATION_BATCH = LocationBatchBody.compile()
_REGISTRATION_2011 = Registration2011.compile()
_REGISTRATION_2013 = Registration2013.compile()
_REGISTRATION_2019 = Registration2019.compile()
_AUTH_2013 = Authentication2013.compile()
_AUTH_2019 = Authentication2019.compile()
_REGISTRATION_RESPONSE = RegistrationResponse.compile()
_SET_PARAMS = SetParamsBody.compile()
_TEXT_2013 = TextMessage2013.compile()
_TEXT_2019 = TextMessage2019.compile()

# Public compiled forms, for the simulator and tests (same declarations, compiled once).
compiled = {
    "GeneralResponse": _GENERAL_RESPONSE,
    "LocationBody": _LOCATION,
    "LocationBatchBody": _LOCATION_BATCH,
    "Registration2013": _REGISTRATION_2013,
    "Registration2019": _REGISTRATION_2019,
    "Authentication2013": _AUTH_2013,
    "Authentication2019": _AUTH_2019,
    "RegistrationResponse": _REGISTRATION_RESPONSE,
    "SetParamsBody": _SET_PARAMS,
    "TextMessage2013": _TEXT_2013,
    "TextMessage2019": _TEXT_2019,
}

# --- byte helpers -----------------------------------------------------------------------


def xor_check(data: bytes) -> int:
    """Return the JT/T 808 check code: XOR of every byte of ``data``."""
    n = len(data)
    if n <= 48:
        return functools.reduce(operator.xor, data, 0)
    # Folding the big integer in halves keeps long frames at a few C-level operations.
    x = int.from_bytes(data, "big")
    while n > 1:
        half = n >> 1
        shift = half << 3
        x = (x >> shift) ^ (x & ((1 << shift) - 1))
        n -= half
    return x


def escape(data: bytes) -> bytes:
    """Escape ``0x7D`` -> ``7D 01`` and ``0x7E`` -> ``7D 02`` (0x7D first, or we'd re-escape)."""
    return data.replace(b"\x7d", b"\x7d\x01").replace(b"\x7e", b"\x7d\x02")


def unescape(data: bytes) -> bytes | None:
    """Undo :func:`escape`; None when a ``0x7D`` is followed by anything but 01 or 02."""
    escapes = data.count(b"\x7d")
    if not escapes:
        return data
    # Every valid 0x7D starts exactly one "7D 01" or "7D 02" and the two patterns cannot
    # overlap, so the counts agree if and only if every escape is well formed.
    if escapes != data.count(b"\x7d\x01") + data.count(b"\x7d\x02"):
        return None
    return data.replace(b"\x7d\x02", b"\x7e").replace(b"\x7d\x01", b"\x7d")


def phone_to_bcd(phone: str, edition: int = EDITION_2013) -> bytes:
    """Encode a terminal phone number as BCD[6] (2013) or BCD[10] (2019), left-padded with 0."""
    width = 20 if edition == EDITION_2019 else 12
    if not phone.isdigit() or len(phone) > width:
        raise ValueError(f"phone {phone!r} does not fit BCD[{width // 2}]")
    return bytes.fromhex(phone.rjust(width, "0"))


def bcd_to_ident(raw: bytes) -> str:
    """The ident for a BCD phone field: its digits with leading zeros removed ("0" if none)."""
    # Non-decimal nibbles (some vendors put hex ids here) are kept as lowercase hex digits.
    return raw.hex().lstrip("0") or "0"


def bcd_time_to_epoch(raw: bytes) -> float | None:
    """Convert BCD ``YYMMDDhhmmss`` in GMT+8 to a Unix timestamp; None if not a valid time."""
    digits = raw.hex()
    if len(digits) != 12 or not digits.isdigit():
        return None
    try:
        when = dt.datetime(
            2000 + int(digits[0:2]),
            int(digits[2:4]),
            int(digits[4:6]),
            int(digits[6:8]),
            int(digits[8:10]),
            int(digits[10:12]),
            tzinfo=_GMT8,
        )
    except ValueError:
        return None
    return when.timestamp()


def epoch_to_bcd_time(ts: float) -> bytes:
    """Convert a Unix timestamp to BCD ``YYMMDDhhmmss`` in GMT+8."""
    when = dt.datetime.fromtimestamp(ts, _GMT8)
    return bytes.fromhex(when.strftime("%y%m%d%H%M%S"))


def _text(raw: bytes) -> str:
    """A fixed-width or trailing text field: GBK, NUL/space padding stripped."""
    return raw.split(b"\x00", 1)[0].strip(b" ").decode("gbk", errors="replace")


# --- frames -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    """One checked, unescaped JT/T 808 message: header fields plus raw body."""

    msg_id: int
    edition: int
    version: int  # the 2019 protocol-version byte; 0 for 2013
    phone: bytes  # raw BCD, echoed unchanged in replies
    serial: int
    body: bytes
    encryption: int = 0
    packet_total: int = 0  # 0 when not sub-packaged
    packet_index: int = 0

    @property
    def ident(self) -> str:
        """The terminal ident (see :func:`bcd_to_ident`)."""
        return bcd_to_ident(self.phone)


class FrameError(Exception):
    """A delimited frame that cannot be used; ``reason`` is a DecodeError metric label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


def parse_frame(data: bytes) -> Frame:
    """Check and split one unescaped frame (no delimiters) into header and body.

    Raises:
        FrameError: ``malformed`` (too short), ``bad_check`` or ``bad_length``.
    """
    if len(data) < _MIN_FRAME:
        raise FrameError("malformed", f"{len(data)} bytes is shorter than any header")
    if xor_check(data[:-1]) != data[-1]:
        raise FrameError("bad_check")
    attr_hi = data[2]
    versioned = bool(attr_hi & 0x40)
    header_len = (17 if versioned else 12) + (4 if attr_hi & 0x20 else 0)
    if len(data) < header_len + 1:
        raise FrameError("bad_length", "frame shorter than its header")
    if versioned:
        h = _HEADER_2019.parse(data[:header_len])
        edition, version = EDITION_2019, h.version
    else:
        h = _HEADER_2013.parse(data[:header_len])
        edition, version = EDITION_2013, 0
    body = data[header_len:-1]
    if len(body) != h.attr.length:
        raise FrameError("bad_length", f"attributes say {h.attr.length}, frame has {len(body)}")
    packet = h.packet
    return Frame(
        msg_id=h.msg_id,
        edition=edition,
        version=version,
        phone=h.phone,
        serial=h.serial,
        body=body,
        encryption=h.attr.encryption,
        packet_total=packet.total if packet is not None else 0,
        packet_index=packet.index if packet is not None else 0,
    )


def build_frame(
    msg_id: int,
    body: bytes,
    *,
    phone: bytes,
    serial: int,
    edition: int = EDITION_2013,
    version: int = 1,
    packet: tuple[int, int] | None = None,
) -> bytes:
    """Build one complete frame: ``7E`` escaped(header, body, check) ``7E``.

    Args:
        msg_id: message id.
        body: message body (at most 1023 bytes).
        phone: raw BCD phone field, 6 bytes (2013) or 10 bytes (2019).
        serial: header serial (wrapped to 16 bits).
        edition: 2013 or 2019.
        version: the 2019 protocol-version byte (ignored for 2013).
        packet: (total, index) for a sub-packet, else None.
    """
    if len(body) > MAX_BODY:
        raise ValueError(f"body of {len(body)} bytes exceeds {MAX_BODY}")
    attr = {
        "reserved": False,
        "versioned": edition == EDITION_2019,
        "subpacket": packet is not None,
        "encryption": 0,
        "length": len(body),
    }
    pk = None if packet is None else {"total": packet[0], "index": packet[1]}
    fields = {"msg_id": msg_id, "attr": attr, "phone": phone, "serial": serial & 0xFFFF}
    if edition == EDITION_2019:
        if len(phone) != 10:
            raise ValueError("2019 phone field is BCD[10]")
        header = _HEADER_2019.build({**fields, "version": version, "packet": pk})
    else:
        if len(phone) != 6:
            raise ValueError("2013 phone field is BCD[6]")
        header = _HEADER_2013.build({**fields, "packet": pk})
    payload = header + body
    return b"\x7e" + escape(payload + bytes((xor_check(payload),))) + b"\x7e"


class FrameSplitter:
    """Reassemble a TCP byte stream into checked :class:`Frame` objects.

    Bytes outside ``7E ... 7E`` are noise (one ``DecodeError("noise")`` per run).  ``7E 7E``
    is the end of one frame and the start of the next.  A frame growing past ``max_frame``
    unescaped bytes is dropped (``oversized``) and the next ``7E`` is taken as a start.
    More than ``max_junk`` unusable bytes without one good frame is fatal.
    """

    def __init__(self, max_frame: int = 2048, max_junk: int = 4096) -> None:
        self._max_frame = max_frame
        self._max_junk = max_junk
        self._buf = bytearray()
        self._in_frame = False
        self._in_noise = False
        self._discarding = False
        self._junk = 0
        self._dead = False

    @property
    def dead(self) -> bool:
        """True once the stream was declared untrustworthy; feed then returns nothing."""
        return self._dead

    def feed(self, data: bytes) -> list[Frame | DecodeError]:
        """Consume bytes; return every complete frame (or its error) in stream order."""
        if self._dead:
            return []
        out: list[Frame | DecodeError] = []
        buf = self._buf
        buf += data
        pos = 0
        while not self._dead:
            if not self._in_frame:
                i = buf.find(FLAG, pos)
                end = len(buf) if i < 0 else i
                if end > pos:
                    if not self._in_noise and not self._discarding:
                        self._in_noise = True
                        out.append(DecodeError("noise", detail="bytes outside 7E delimiters"))
                    self._add_junk(end - pos, out)
                if i < 0:
                    pos = len(buf)
                    break
                self._in_noise = self._discarding = False
                self._in_frame = True
                pos = i + 1
                continue
            j = buf.find(FLAG, pos)
            if j < 0:
                pending = len(buf) - pos
                if pending > self._max_frame and pending - buf.count(ESC, pos) > self._max_frame:
                    out.append(self._oversized())
                    self._in_frame = False
                    self._discarding = True
                    self._add_junk(pending, out)
                    pos = len(buf)
                break
            raw = bytes(buf[pos:j])
            pos = j + 1
            if not raw:
                continue  # "7E 7E": the second flag opens the next frame
            if len(raw) - raw.count(ESC) > self._max_frame:
                # Same outcome as when the flag arrives late: the next 7E is a start, so this
                # closing flag opens the following frame.
                out.append(self._oversized())
                self._add_junk(len(raw), out)
                continue
            self._in_frame = False
            result = self._decode(raw)
            out.append(result)
            if isinstance(result, DecodeError):
                self._add_junk(len(raw), out)
            else:
                self._junk = 0
        del buf[:pos]
        if self._dead:
            buf.clear()
        return out

    def _oversized(self) -> DecodeError:
        # The same detail whether the closing flag arrived in this feed or not, so results do
        # not depend on how TCP split the stream.
        return DecodeError("oversized", detail=f"frame longer than {self._max_frame} bytes")

    @staticmethod
    def _decode(raw: bytes) -> Frame | DecodeError:
        data = unescape(raw)
        if data is None:
            return DecodeError("bad_escape", detail="0x7D not followed by 01 or 02")
        try:
            return parse_frame(data)
        except FrameError as exc:
            return DecodeError(exc.reason, detail=exc.detail)

    def _add_junk(self, n: int, out: list[Frame | DecodeError]) -> None:
        self._junk += n
        if self._junk > self._max_junk and not self._dead:
            self._dead = True
            out.append(
                DecodeError(
                    "noise", fatal=True, detail=f"{self._junk} unusable bytes and no valid frame"
                )
            )


# --- location decoding ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Fix:
    """What one 0x0200 body says, in event terms."""

    trigger: SosTrigger | None
    location: Location | None
    terminal_time: float | None
    battery: int | None
    signal: int | None


def _read_location(body: Container) -> _Fix:
    alarm: int = body.alarm
    status: int = body.status
    if alarm & ALARM_EMERGENCY:
        trigger: SosTrigger | None = SosTrigger.BUTTON
    elif alarm & ALARM_FALL_BITS:
        trigger = SosTrigger.FALL
    else:
        trigger = None
    location = None
    lat = body.lat / 1_000_000
    lon = body.lon / 1_000_000
    # A fix outside the globe is a broken receiver, not a place to send help to.
    if status & STATUS_FIXED and lat <= 90 and lon <= 180:
        location = Location(
            lat=-lat if status & STATUS_SOUTH else lat,
            lon=-lon if status & STATUS_WEST else lon,
        )
    battery = signal = None
    for item in body.additional:
        value: bytes = item.value
        if item.id == ITEM_BATTERY and len(value) == 1 and value[0] <= 100:
            battery = value[0]
        elif item.id == ITEM_SIGNAL and len(value) == 1 and value[0] <= _SIGNAL_MAX:
            signal = round(value[0] * 100 / _SIGNAL_MAX)
    return _Fix(trigger, location, bcd_time_to_epoch(body.time), battery, signal)


def _fix_event(ident: str, seq: int, fix: _Fix, *, batch: bool) -> list[TerminalEvent]:
    if fix.trigger is not None:
        return [
            Sos(
                ident=ident,
                seq=seq,
                trigger=fix.trigger,
                location=fix.location,
                terminal_time=fix.terminal_time,
                battery=fix.battery,
            )
        ]
    events: list[TerminalEvent] = []
    if fix.location is not None:
        events.append(LocationReport(ident=ident, location=fix.location))
    # A batch item stays one event; a single report adds the power/radio state as a heartbeat,
    # and an unfixed report still proves the terminal alive.
    if not events or (not batch and (fix.battery is not None or fix.signal is not None)):
        events.append(Heartbeat(ident=ident, battery=fix.battery, signal=fix.signal))
    return events


# --- the server codec -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Ctx:
    """What a reply to one inbound frame needs; ``answer`` marks the one Inbound to answer."""

    msg_id: int
    serial: int
    phone: bytes
    edition: int
    version: int
    answer: bool = True


_REJECT_RESULT = {
    Reject.MALFORMED: RESULT_MESSAGE_ERROR,
    Reject.UNSUPPORTED_TYPE: RESULT_UNSUPPORTED,
}


def _reject_result(outcome: Outcome) -> int:
    """The 0x8001 result byte for a refusal: 2/3 where the standard has a code, else 1."""
    if outcome.reason is None:
        return RESULT_FAIL
    return _REJECT_RESULT.get(outcome.reason, RESULT_FAIL)


class Jt808Codec:
    """Server side of one JT/T 808 TCP connection (implements ``StreamCodec``)."""

    protocol = "jt808"

    #: 0x8001 result for an accepted SOS: the standard's "alarm confirmed".
    sos_ack_result = RESULT_ALARM_CONFIRMED

    def __init__(self, max_frame: int = 2048) -> None:
        self._splitter = FrameSplitter(max_frame)
        self._serial = 0
        self._phone: bytes | None = None
        self._edition = EDITION_2013
        self._version = 0
        self._pending: dict[tuple[int, int, int], dict[int, bytes]] = {}

    # -- inbound ------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Inbound | DecodeError]:
        """Consume received bytes; return every complete frame's result in order."""
        out: list[Inbound | DecodeError] = []
        try:
            items = self._splitter.feed(data)
        except Exception as exc:  # a framing bug must not kill the connection handler
            return [DecodeError("malformed", fatal=True, detail=f"framing failed: {exc!r}")]
        for item in items:
            if isinstance(item, DecodeError):
                out.append(item)
                continue
            try:
                out.extend(self._on_frame(item))
            except Exception as exc:  # never raise from feed; one bad body loses one frame
                out.append(
                    DecodeError(
                        "malformed",
                        detail=f"0x{item.msg_id:04x}: {exc!r}",
                        reply=self._response(item, RESULT_MESSAGE_ERROR),
                    )
                )
        return out

    def _on_frame(self, frame: Frame) -> list[Inbound | DecodeError]:
        self._phone, self._edition, self._version = frame.phone, frame.edition, frame.version
        if frame.encryption:
            return [
                DecodeError(
                    "malformed",
                    detail="encrypted body is not supported",
                    reply=self._response(frame, RESULT_UNSUPPORTED),
                )
            ]
        seq = frame.serial
        if frame.packet_total:
            assembled = self._reassemble(frame)
            if isinstance(assembled, DecodeError):
                return [assembled]
            frame, seq = assembled
        handler = self._HANDLERS.get(frame.msg_id)
        if handler is None:
            return [
                DecodeError(
                    "unknown_type",
                    detail=f"message id 0x{frame.msg_id:04x}",
                    reply=self._response(frame, RESULT_UNSUPPORTED),
                )
            ]
        try:
            events = handler(self, frame, seq)
        except (ConstructError, ValueError, IndexError) as exc:
            return [
                DecodeError(
                    "malformed",
                    detail=f"0x{frame.msg_id:04x} body: {exc}",
                    reply=self._response(frame, RESULT_MESSAGE_ERROR),
                )
            ]
        return self._wrap(frame, events)

    def _wrap(self, frame: Frame, events: list[TerminalEvent]) -> list[Inbound | DecodeError]:
        # One frame gets one reply.  It rides on the first SOS when there is one, so an SOS
        # refused with TRY_LATER leaves the whole frame unanswered and the terminal resends it.
        answer = next((i for i, ev in enumerate(events) if isinstance(ev, Sos)), 0)
        ctx = _Ctx(frame.msg_id, frame.serial, frame.phone, frame.edition, frame.version)
        quiet = replace(ctx, answer=False)
        return [Inbound(ev, ctx if i == answer else quiet) for i, ev in enumerate(events)]

    def _reassemble(self, frame: Frame) -> tuple[Frame, int] | DecodeError:
        total, index = frame.packet_total, frame.packet_index
        if not 1 <= index <= total:
            return DecodeError(
                "malformed",
                detail=f"sub-packet {index}/{total}",
                reply=self._response(frame, RESULT_MESSAGE_ERROR),
            )
        # Sub-packets of one message carry consecutive serials, so the first one names the group.
        first = (frame.serial - index + 1) & 0xFFFF
        key = (frame.msg_id, total, first)
        parts = self._pending.pop(key, {})
        parts[index] = frame.body
        if len(parts) < total:
            self._pending[key] = parts  # re-inserted last: eviction drops the stalest group
            while len(self._pending) > _MAX_PENDING_GROUPS or self._pending_bytes() > (
                _MAX_PENDING_BYTES
            ):
                del self._pending[next(iter(self._pending))]
            return DecodeError(
                "sub_packet",
                detail=f"0x{frame.msg_id:04x} part {index}/{total} held",
                reply=self._response(frame, RESULT_OK),
            )
        body = b"".join(parts[i] for i in range(1, total + 1))
        return replace(frame, body=body, packet_total=0, packet_index=0), first

    def _pending_bytes(self) -> int:
        return sum(len(b) for parts in self._pending.values() for b in parts.values())

    # -- message handlers: (frame, seq) -> events ----------------------------------------

    def _on_terminal_response(self, frame: Frame, seq: int) -> list[TerminalEvent]:
        r = _GENERAL_RESPONSE.parse(frame.body)
        return [CommandAck(ident=frame.ident, ref_seq=r.reply_serial, ok=r.result == RESULT_OK)]

    def _on_heartbeat(self, frame: Frame, seq: int) -> list[TerminalEvent]:
        return [Heartbeat(ident=frame.ident)]

    def _on_logout(self, frame: Frame, seq: int) -> list[TerminalEvent]:
        return [Logout(ident=frame.ident)]

    def _on_register(self, frame: Frame, seq: int) -> list[TerminalEvent]:
        if frame.edition == EDITION_2019:
            r = _REGISTRATION_2019.parse(frame.body)
        elif len(frame.body) < 37:
            # 37 = the 2013 layout with an empty plate: anything shorter is the 2011 layout.
            r = _REGISTRATION_2011.parse(frame.body)
        else:
            r = _REGISTRATION_2013.parse(frame.body)
        return [
            Register(
                ident=frame.ident,
                maker=_text(r.maker),
                model=_text(r.model),
                terminal_id=_text(r.terminal_id),
            )
        ]

    def _on_authenticate(self, frame: Frame, seq: int) -> list[TerminalEvent]:
        if frame.edition == EDITION_2019:
            a = _AUTH_2019.parse(frame.body)
            return [Login(ident=frame.ident, auth_code=_text(a.code), firmware=_text(a.software))]
        a = _AUTH_2013.parse(frame.body)
        return [Login(ident=frame.ident, auth_code=_text(a.code), firmware="")]

    def _on_location(self, frame: Frame, seq: int) -> list[TerminalEvent]:
        fix = _read_location(_LOCATION.parse(frame.body))
        return _fix_event(frame.ident, seq, fix, batch=False)

    def _on_location_batch(self, frame: Frame, seq: int) -> list[TerminalEvent]:
        batch = _LOCATION_BATCH.parse(frame.body)
        events: list[TerminalEvent] = []
        for body in batch.locations:
            events.extend(_fix_event(frame.ident, seq, _read_location(body), batch=True))
        if not events:
            raise ValueError("empty location batch")
        return events

    _HANDLERS = {
        MSG_TERMINAL_RESPONSE: _on_terminal_response,
        MSG_HEARTBEAT: _on_heartbeat,
        MSG_LOGOUT: _on_logout,
        MSG_REGISTER: _on_register,
        MSG_AUTHENTICATE: _on_authenticate,
        MSG_LOCATION: _on_location,
        MSG_LOCATION_BATCH: _on_location_batch,
    }

    # -- outbound -----------------------------------------------------------------------

    def reply(self, inbound: Inbound, outcome: Outcome) -> bytes | None:
        """Bytes answering ``inbound`` (0x8001 or 0x8100), or None when no reply is due.

        Only one Inbound per frame is answered.  A terminal general response is never
        answered.  An SOS refused with ``TRY_LATER`` is not answered so the terminal resends.
        """
        ctx = inbound.ctx
        if not isinstance(ctx, _Ctx) or not ctx.answer:
            return None
        event = inbound.event
        if isinstance(event, CommandAck):
            return None
        if isinstance(event, Register):
            if outcome.ok:
                code = outcome.auth_code if outcome.auth_code is not None else event.ident
                body = _REGISTRATION_RESPONSE.build(
                    {
                        "reply_serial": ctx.serial,
                        "result": REGISTER_OK,
                        "auth_code": code.encode("gbk"),
                    }
                )
            elif outcome.reason == Reject.TRY_LATER:
                return None  # the terminal registers again after its timeout
            else:
                body = _REGISTRATION_RESPONSE.build(
                    {
                        "reply_serial": ctx.serial,
                        "result": REGISTER_NO_SUCH_TERMINAL,
                        "auth_code": b"",
                    }
                )
            return self._platform_frame(ctx, MSG_REGISTER_RESPONSE, body)
        if isinstance(event, Sos):
            if outcome.ok:
                result = self.sos_ack_result
            elif outcome.reason == Reject.TRY_LATER:
                return None  # not stored yet: silence makes the terminal resend the alarm
            else:
                result = _reject_result(outcome)
        elif outcome.ok:
            result = RESULT_OK
        else:
            result = _reject_result(outcome)
        body = _GENERAL_RESPONSE.build(
            {"reply_serial": ctx.serial, "reply_id": ctx.msg_id, "result": result}
        )
        return self._platform_frame(ctx, MSG_PLATFORM_RESPONSE, body)

    def command(self, ident: str, command: Command, seq: int) -> bytes | None:
        """Bytes carrying ``command`` (0x8103 for Settings, 0x8300 for CarePrompt).

        The header serial is ``seq``, so the terminal's 0x0001 answer comes back as
        ``CommandAck(ref_seq=seq)``.  Returns None if the command cannot be encoded.
        """
        edition, version = self._edition, self._version or 1
        if self._phone is not None and bcd_to_ident(self._phone) == ident:
            phone = self._phone
        else:
            try:
                phone = phone_to_bcd(ident, edition)
            except ValueError:
                return None
        try:
            if isinstance(command, Settings):
                msg_id, body = MSG_SET_PARAMS, settings_body(command)
            elif isinstance(command, CarePrompt):
                msg_id, body = MSG_TEXT, care_prompt_body(command, edition)
            else:
                return None
        except (ConstructError, ValueError):
            return None  # e.g. more than 255 parameters or a number longer than 255 bytes
        if len(body) > MAX_BODY:
            return None
        return build_frame(msg_id, body, phone=phone, serial=seq, edition=edition, version=version)

    def _response(self, frame: Frame, result: int) -> bytes:
        """A 0x8001 answering ``frame`` directly (used for errors and sub-packets)."""
        ctx = _Ctx(frame.msg_id, frame.serial, frame.phone, frame.edition, frame.version)
        body = _GENERAL_RESPONSE.build(
            {"reply_serial": frame.serial, "reply_id": frame.msg_id, "result": result}
        )
        return self._platform_frame(ctx, MSG_PLATFORM_RESPONSE, body)

    def _platform_frame(self, ctx: _Ctx, msg_id: int, body: bytes) -> bytes:
        serial = self._serial
        self._serial = (serial + 1) & 0xFFFF
        return build_frame(
            msg_id,
            body,
            phone=ctx.phone,
            serial=serial,
            edition=ctx.edition,
            version=ctx.version,
        )


def settings_body(settings: Settings) -> bytes:
    """0x8103 body: heartbeat interval (0x0001) and one 0x0040 item per contact number.

    0x0040 is the standard's monitoring-platform phone number; several numbers go as repeated
    items with the same id, the standard's rule for multi-value parameters.
    """
    interval = max(0, min(settings.heartbeat_interval_s, 0xFFFFFFFF))
    params = [{"id": PARAM_HEARTBEAT_INTERVAL, "value": interval.to_bytes(4, "big")}]
    params += [
        {"id": PARAM_MONITOR_PHONE, "value": n.encode("gbk")} for n in settings.contact_numbers
    ]
    return _SET_PARAMS.build({"params": params})


def care_prompt_body(prompt: CarePrompt, edition: int = EDITION_2013) -> bytes:
    """0x8300 body: display + read aloud (TTS) the care prompt text, GBK, with the round id."""
    text = CARE_PROMPT_TEXT.format(round_id=prompt.round_id).encode("gbk")
    flag = TEXT_FLAG_DISPLAY | TEXT_FLAG_TTS
    if edition == EDITION_2019:
        return _TEXT_2019.build({"flag": flag, "text_type": TEXT_TYPE_NOTICE, "text": text})
    return _TEXT_2013.build({"flag": flag, "text": text})
