"""Terminal side of GT06: what a Concox-style one-button terminal sends and understands.

The terminal simulator drives this to talk to the server.  Frames are built and
parsed with the very declarations the server codec uses
(:mod:`dispatch.protocol.gt06`), so the two sides cannot drift apart silently;
the published example frames in the unit tests keep both honest.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

from dispatch.events import CareAnswer, Location, SosTrigger
from dispatch.protocol.base import DecodeError
from dispatch.protocol.gt06 import (
    ALARM_CODE_FALL,
    ALARM_CODE_SOS,
    ALARM_STRUCTS,
    COMMAND_TEXT,
    HEARTBEAT_STATUS,
    LOCATION_22,
    LOGIN_EXTENDED,
    PROTO,
    STRING_INFO,
    VOLTAGE_LEVEL_PERCENT,
    Gt06FrameReader,
    build_frame,
)

__all__ = ["Gt06TerminalCodec"]

AckKey = tuple[int, int]
"""(protocol number, serial): identifies the server echo that acknowledges a frame."""

_LANGUAGE_ENGLISH = 0x02
_SOS_BITS = 0b100
_CARE_COMMAND = re.compile(r"^CARE,(\d+)#$")


def _level(percent: int) -> int:
    """Battery percent -> voltage level 0-6: the highest level not above ``percent``."""
    level = 0
    for candidate, floor in enumerate(VOLTAGE_LEVEL_PERCENT):
        if percent >= floor:
            level = candidate
    return level


def _gps(location: Location | None, terminal_time: float) -> dict[str, Any]:
    when = datetime.fromtimestamp(terminal_time, UTC)
    positioned = location is not None
    lat = location.lat if location is not None else 0.0
    lon = location.lon if location is not None else 0.0
    return {
        "time": {
            "year": when.year - 2000,
            "month": when.month,
            "day": when.day,
            "hour": when.hour,
            "minute": when.minute,
            "second": when.second,
        },
        "info": {"length": 12, "satellites": 8 if positioned else 0},
        "lat": round(abs(lat) * 1_800_000),
        "lon": round(abs(lon) * 1_800_000),
        "speed": 0,
        "course_status": {
            "reserved": 0,
            "differential": False,
            "positioned": positioned,
            "west": lon < 0,
            "north": lat >= 0,
            "course": 0,
        },
    }


def _info(*, charging: bool = False, gps_fixed: bool = False, alarm: int = 0) -> dict[str, Any]:
    return {
        "oil_cut": False,
        "gps_fixed": gps_fixed,
        "alarm": alarm,
        "charging": charging,
        "acc": False,
        "armed": False,
    }


_NO_CELL = {"mcc": 0, "mnc": 0, "lac": 0, "cell_id": 0}


class Gt06TerminalCodec:
    """Builds the frames one GT06 terminal sends and parses the server's frames.

    Every frame builder takes the next 16-bit serial (the first frame is 1, as on
    a freshly booted terminal).
    """

    def __init__(self, imei: str, type_id: int = 0x0000) -> None:
        if len(imei) != 15 or not imei.isdigit():
            raise ValueError(f"IMEI must be 15 digits: {imei!r}")
        self.imei = imei
        self.type_id = type_id
        self.serial = 0
        self._reader = Gt06FrameReader(max_frame=1024)
        self._care_flags: dict[int, int] = {}

    def _next_serial(self) -> int:
        self.serial = (self.serial + 1) & 0xFFFF
        return self.serial

    @staticmethod
    def ack_key(proto: int, serial: int) -> AckKey:
        """The key of the server echo acknowledging frame ``proto``/``serial``."""
        return (proto, serial & 0xFFFF)

    # --- terminal -> server ---

    def login(self) -> bytes:
        """Login 0x01 with IMEI, type id and time zone UTC / English."""
        content = LOGIN_EXTENDED.build(
            {
                "imei": self.imei,
                "type_id": self.type_id,
                "tz_language": {
                    "offset_hhmm": 0,
                    "west": False,
                    "reserved": 0,
                    "language": _LANGUAGE_ENGLISH,
                },
                "extra": b"",
            }
        )
        return build_frame(PROTO.LOGIN, content, self._next_serial())

    def heartbeat(self, battery: int, charging: bool, signal: int) -> bytes:
        """Status 0x13; ``battery`` and ``signal`` in percent, sent as levels 0-6 and 0-4."""
        content = HEARTBEAT_STATUS.build(
            {
                "info": _info(charging=charging),
                "voltage_level": _level(battery),
                "gsm_signal": max(0, min(4, signal // 25)),
                "alarm": 0,
                "language": _LANGUAGE_ENGLISH,
                "extra": b"",
            }
        )
        return build_frame(PROTO.STATUS, content, self._next_serial())

    def sos(
        self,
        trigger: SosTrigger,
        location: Location | None,
        terminal_time: float,
        battery: int,
    ) -> tuple[bytes, AckKey]:
        """Alarm 0x26 (SOS code 0x01, fall 0x23); returns the frame and its ack key.

        GT06 has no code for :attr:`SosTrigger.OTHER`; it goes out as a button SOS.
        A resend of the same alarm must reuse the frame (and so the serial).
        """
        fall = trigger == SosTrigger.FALL
        content = ALARM_STRUCTS[(9, False)].build(
            {
                "gps": _gps(location, terminal_time),
                "lbs": {"lbs_length": 9, "cell": _NO_CELL},
                "status": {
                    "info": _info(gps_fixed=location is not None, alarm=0 if fall else _SOS_BITS),
                    "voltage_level": _level(battery),
                    "gsm_signal": 4,
                    "alarm": ALARM_CODE_FALL if fall else ALARM_CODE_SOS,
                    "language": _LANGUAGE_ENGLISH,
                },
                "extra": b"",
            }
        )
        serial = self._next_serial()
        return build_frame(PROTO.ALARM_UTC, content, serial), self.ack_key(PROTO.ALARM_UTC, serial)

    def location(self, location: Location, terminal_time: float | None = None) -> bytes:
        """GPS location 0x22 (real-time upload, fix valid)."""
        when = time.time() if terminal_time is None else terminal_time
        content = LOCATION_22.build(
            {
                "gps": _gps(location, when),
                "cell": _NO_CELL,
                "acc": 0,
                "upload_mode": 0,
                "reupload": 0,
                "extra": b"",
            }
        )
        return build_frame(PROTO.LOCATION_UTC, content, self._next_serial())

    def string_reply(self, text: str, server_flag: int) -> bytes:
        """Answer 0x21 (long framing, ASCII) to an online command carrying ``server_flag``."""
        content = STRING_INFO.build(
            {"server_flag": server_flag & 0xFFFFFFFF, "encoding": 1, "text": text.encode("ascii")}
        )
        return build_frame(PROTO.STRING_INFO, content, self._next_serial(), long=True)

    def care_answer(self, round_id: int, answer: CareAnswer) -> bytes | None:
        """``CARE,<round>,OK|HELP#`` as a 0x21 reply, or None when the subscriber did nothing.

        Only vendor firmware with a care prompt can do this; stock GT06 cannot.
        """
        if answer == CareAnswer.NO_INPUT:
            return None
        word = "OK" if answer == CareAnswer.OK else "HELP"
        flag = self._care_flags.get(round_id, 0)
        return self.string_reply(f"CARE,{round_id},{word}#", flag)

    # --- server -> terminal ---

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Parse server bytes into ``login_ack`` / ``ack`` / ``command`` / ``error`` dicts."""
        messages: list[dict[str, Any]] = []
        for item in self._reader.feed(data):
            if isinstance(item, DecodeError):
                messages.append({"type": "error", "reason": item.reason, "fatal": item.fatal})
                continue
            key = self.ack_key(item.proto, item.serial)
            if item.proto == PROTO.ONLINE_COMMAND:
                parsed = COMMAND_TEXT.parse(item.content)
                text = parsed.text.decode("ascii", "replace")
                care = _CARE_COMMAND.match(text)
                if care:
                    self._care_flags[int(care.group(1))] = parsed.server_flag
                messages.append(
                    {
                        "type": "command",
                        "text": text,
                        "server_flag": parsed.server_flag,
                        "serial": item.serial,
                    }
                )
            elif item.content:
                messages.append({"type": "unknown", "proto": item.proto, "serial": item.serial})
            elif item.proto == PROTO.LOGIN:
                messages.append({"type": "login_ack", "serial": item.serial, "key": key})
            else:
                messages.append(
                    {"type": "ack", "proto": item.proto, "serial": item.serial, "key": key}
                )
        return messages
