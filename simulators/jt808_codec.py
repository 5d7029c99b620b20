"""Terminal side of JT/T 808, for the terminal simulator and tests.

Builds terminal frames and reads platform frames with the very declarations the server
codec uses (``dispatch.protocol.jt808``), so the two cannot drift apart.  Pure bytes: no
sockets, no clock except where a caller leaves the terminal time out.
"""

from __future__ import annotations

import time

from construct import ConstructError

from dispatch.events import CareAnswer, Location, SosTrigger
from dispatch.protocol.base import DecodeError
from dispatch.protocol.jt808 import (
    ALARM_EMERGENCY,
    ALARM_ROLLOVER,
    EDITION_2013,
    EDITION_2019,
    ITEM_BATTERY,
    ITEM_SIGNAL,
    MSG_AUTHENTICATE,
    MSG_HEARTBEAT,
    MSG_LOCATION,
    MSG_LOGOUT,
    MSG_PLATFORM_RESPONSE,
    MSG_REGISTER,
    MSG_REGISTER_RESPONSE,
    MSG_SET_PARAMS,
    MSG_TERMINAL_RESPONSE,
    MSG_TEXT,
    PARAM_HEARTBEAT_INTERVAL,
    PARAM_MONITOR_PHONE,
    REGISTER_OK,
    STATUS_FIXED,
    STATUS_SOUTH,
    STATUS_WEST,
    Frame,
    FrameSplitter,
    build_frame,
    compiled,
    epoch_to_bcd_time,
    phone_to_bcd,
)

MAKER = "DSPCH"
MODEL = "SIM-1"
SOFTWARE = "dispatch-sim 1.0"


def _fixed(text: str, width: int) -> bytes:
    """A fixed-width field, NUL padded (the standard's padding for maker/model/id)."""
    raw = text.encode("gbk")[:width]
    return raw.ljust(width, b"\x00")


class Jt808TerminalCodec:
    """Frames one simulated JT/T 808 terminal sends, and a reader for what the server sends.

    Args:
        phone: the terminal phone number (its ident), up to 12 digits (2013) or 20 (2019).
        edition: 2013 or 2019 header and body layouts.
        auth_code: an authentication code from an earlier registration, if any.
        version: the 2019 protocol-version byte.
    """

    def __init__(
        self,
        phone: str,
        edition: int = EDITION_2013,
        *,
        auth_code: str | None = None,
        version: int = 1,
    ) -> None:
        if edition not in (EDITION_2013, EDITION_2019):
            raise ValueError(f"unknown JT/T 808 edition {edition}")
        self.phone = phone
        self.edition = edition
        self.version = version
        self.auth_code = auth_code
        self._phone_bcd = phone_to_bcd(phone, edition)
        self._serial = 0
        self._splitter = FrameSplitter()

    # -- terminal -> platform -----------------------------------------------------------

    def _frame(self, msg_id: int, body: bytes) -> tuple[bytes, int]:
        serial = self._serial
        self._serial = (serial + 1) & 0xFFFF
        frame = build_frame(
            msg_id,
            body,
            phone=self._phone_bcd,
            serial=serial,
            edition=self.edition,
            version=self.version,
        )
        return frame, serial

    def register(self) -> bytes:
        """0x0100 registration (maker/model/terminal id padded to the edition's widths)."""
        terminal_id = self.phone[-7:]
        if self.edition == EDITION_2019:
            body = compiled["Registration2019"].build(
                {
                    "province": 33,
                    "city": 300,
                    "maker": _fixed(MAKER, 11),
                    "model": _fixed(MODEL, 30),
                    "terminal_id": _fixed(terminal_id, 30),
                    "plate_color": 0,
                    "plate": b"",
                }
            )
        else:
            body = compiled["Registration2013"].build(
                {
                    "province": 33,
                    "city": 300,
                    "maker": _fixed(MAKER, 5),
                    "model": _fixed(MODEL, 20),
                    "terminal_id": _fixed(terminal_id, 7),
                    "plate_color": 0,
                    "plate": b"",
                }
            )
        return self._frame(MSG_REGISTER, body)[0]

    def authenticate(self, auth_code: str) -> bytes:
        """0x0102 authentication with ``auth_code`` (2019 adds IMEI and software version)."""
        code = auth_code.encode("gbk")
        if self.edition == EDITION_2019:
            body = compiled["Authentication2019"].build(
                {
                    "code": code,
                    "imei": _fixed(self.phone[-15:].rjust(15, "0"), 15),
                    "software": _fixed(SOFTWARE, 20),
                }
            )
        else:
            body = compiled["Authentication2013"].build({"code": code})
        return self._frame(MSG_AUTHENTICATE, body)[0]

    def login(self) -> bytes:
        """Authenticate with the stored code when we have one, else register to get one.

        A fresh terminal registers first; :meth:`feed` stores the code from a successful
        0x8100, and the caller then sends ``login()`` again (now an authentication).
        """
        if self.auth_code is not None:
            return self.authenticate(self.auth_code)
        return self.register()

    def keepalive(self) -> bytes:
        """0x0002 heartbeat: empty body, proves only that the terminal is alive."""
        return self._frame(MSG_HEARTBEAT, b"")[0]

    def heartbeat(self, battery: int, charging: bool, signal: int) -> bytes:
        """Report power and radio state: a 0x0200 without a fix, carrying items 0xE1 and 0x30.

        0x0002 has an empty body, so a state report is how JT/T 808 terminals tell battery
        and signal.  JT/T 808 has no standard charging flag; ``charging`` is not sent.
        """
        del charging
        return self._frame(MSG_LOCATION, self._location_body(0, None, None, battery, signal))[0]

    def sos(
        self,
        trigger: SosTrigger,
        location: Location | None,
        terminal_time: float | None,
        battery: int | None,
    ) -> tuple[bytes, object]:
        """0x0200 with an alarm bit set; returns (frame, key) where key is the header serial.

        BUTTON and OTHER set the emergency bit (0); FALL sets the rollover bit (30), which the
        server reads as a fall.
        """
        alarm = ALARM_ROLLOVER if trigger == SosTrigger.FALL else ALARM_EMERGENCY
        body = self._location_body(alarm, location, terminal_time, battery, None)
        return self._frame(MSG_LOCATION, body)

    def location(self, location: Location) -> bytes:
        """0x0200 position report without alarm bits."""
        return self._frame(MSG_LOCATION, self._location_body(0, location, None, None, None))[0]

    def logout(self) -> bytes:
        """0x0003 terminal logout (empty body)."""
        return self._frame(MSG_LOGOUT, b"")[0]

    def care_answer(self, round_id: int, answer: CareAnswer) -> bytes | None:
        """None: JT/T 808 has no structured care answer (0x0001 only confirms display)."""
        del round_id, answer
        return None

    def general_response(self, serial: int, msg_id: int, result: int) -> bytes:
        """0x0001 terminal general response to platform message ``msg_id``/``serial``."""
        body = compiled["GeneralResponse"].build(
            {"reply_serial": serial, "reply_id": msg_id, "result": result}
        )
        return self._frame(MSG_TERMINAL_RESPONSE, body)[0]

    def _location_body(
        self,
        alarm: int,
        location: Location | None,
        terminal_time: float | None,
        battery: int | None,
        signal: int | None,
    ) -> bytes:
        status = 0
        lat = lon = 0
        if location is not None:
            status |= STATUS_FIXED
            if location.lat < 0:
                status |= STATUS_SOUTH
            if location.lon < 0:
                status |= STATUS_WEST
            lat = round(abs(location.lat) * 1_000_000)
            lon = round(abs(location.lon) * 1_000_000)
        additional = []
        if battery is not None:
            additional.append({"id": ITEM_BATTERY, "value": bytes((max(0, min(battery, 100)),))})
        if signal is not None:
            csq = round(max(0, min(signal, 100)) * 31 / 100)
            additional.append({"id": ITEM_SIGNAL, "value": bytes((csq,))})
        when = time.time() if terminal_time is None else terminal_time
        return compiled["LocationBody"].build(
            {
                "alarm": alarm,
                "status": status,
                "lat": lat,
                "lon": lon,
                "altitude": 0,
                "speed": 0,
                "direction": 0,
                "time": epoch_to_bcd_time(when),
                "additional": additional,
            }
        )

    # -- platform -> terminal -----------------------------------------------------------

    def feed(self, data: bytes) -> list[dict[str, object]]:
        """Parse server bytes into JSON-ready dicts, one per frame or framing error.

        Types: ``register_ack`` (result, auth_code, serial), ``ack`` (reply_id, serial of the
        frame acknowledged, result, key = that serial when it acknowledges a 0x0200),
        ``text`` (text, flag, serial), ``settings`` (heartbeat_interval_s, contact_numbers,
        serial), ``unknown`` and ``error``.
        """
        out: list[dict[str, object]] = []
        for item in self._splitter.feed(data):
            if isinstance(item, DecodeError):
                out.append({"type": "error", "reason": item.reason, "detail": item.detail})
                continue
            try:
                out.append(self._read(item))
            except (ConstructError, ValueError) as exc:
                out.append({"type": "error", "reason": "malformed", "detail": str(exc)})
        return out

    def _read(self, frame: Frame) -> dict[str, object]:
        if frame.msg_id == MSG_PLATFORM_RESPONSE:
            r = compiled["GeneralResponse"].parse(frame.body)
            return {
                "type": "ack",
                "reply_id": r.reply_id,
                "serial": r.reply_serial,
                "result": r.result,
                "key": r.reply_serial if r.reply_id == MSG_LOCATION else None,
            }
        if frame.msg_id == MSG_REGISTER_RESPONSE:
            r = compiled["RegistrationResponse"].parse(frame.body)
            code = r.auth_code.decode("gbk", errors="replace") if r.result == REGISTER_OK else None
            if code is not None:
                self.auth_code = code
            return {
                "type": "register_ack",
                "result": r.result,
                "auth_code": code,
                "serial": r.reply_serial,
            }
        if frame.msg_id == MSG_TEXT:
            name = "TextMessage2019" if frame.edition == EDITION_2019 else "TextMessage2013"
            t = compiled[name].parse(frame.body)
            return {
                "type": "text",
                "text": t.text.decode("gbk", errors="replace"),
                "flag": t.flag,
                "serial": frame.serial,
            }
        if frame.msg_id == MSG_SET_PARAMS:
            p = compiled["SetParamsBody"].parse(frame.body)
            interval = None
            numbers: list[str] = []
            for param in p.params:
                if param.id == PARAM_HEARTBEAT_INTERVAL and len(param.value) == 4:
                    interval = int.from_bytes(param.value, "big")
                elif param.id == PARAM_MONITOR_PHONE:
                    numbers.append(param.value.decode("gbk", errors="replace"))
            return {
                "type": "settings",
                "heartbeat_interval_s": interval,
                "contact_numbers": numbers,
                "serial": frame.serial,
            }
        return {"type": "unknown", "msg_id": frame.msg_id, "serial": frame.serial}
