"""Terminal-side native codec: builds what a terminal sends, parses what it receives."""

from __future__ import annotations

from typing import Any

from dispatch import events as ev
from dispatch.protocol import native_format as fmt
from dispatch.protocol.native import check_frame
from dispatch.protocol.native_format import MsgType


def _location_block(loc: ev.Location | None) -> dict[str, int] | None:
    if loc is None:
        return None
    acc = fmt.UNKNOWN_ACCURACY if loc.accuracy_m is None else loc.accuracy_m
    return {"lat_e6": round(loc.lat * 1e6), "lon_e6": round(loc.lon * 1e6), "accuracy_m": acc}


def _name(enum_cls: Any, value: int) -> str:
    """Lower-case member name, or the raw number for values the enum does not know."""
    try:
        return enum_cls(value).name.lower()
    except ValueError:
        return str(value)


class NativeTerminalCodec:
    """Frames of one native terminal, with its own sequence counter."""

    protocol = "native"

    def __init__(self, ident: str, firmware: str = "sim-1.0") -> None:
        self.ident = ident
        self.firmware = firmware
        self._seq = 0
        self._buf = bytearray()

    def _next(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _frame(self, msg_type: MsgType, payload: dict[str, Any]) -> tuple[bytes, int]:
        seq = self._next()
        return fmt.build_frame(msg_type, self.ident, seq, payload), seq

    def login(self) -> bytes:
        """A login frame (answered by an ACK the feed reports as ``login_ack``)."""
        frame, _ = self._frame(MsgType.LOGIN, {"protocol_version": 1, "firmware": self.firmware})
        return frame

    def heartbeat(
        self, battery: int, charging: bool, signal: int, location: ev.Location | None = None
    ) -> bytes:
        """A heartbeat frame."""
        frame, _ = self._frame(
            MsgType.HEARTBEAT,
            {
                "battery": battery,
                "status": fmt.status_byte(charging, location is not None),
                "signal": signal,
                "location": _location_block(location),
            },
        )
        return frame

    def sos(
        self,
        trigger: ev.SosTrigger,
        location: ev.Location | None,
        terminal_time: float,
        battery: int,
    ) -> tuple[bytes, object]:
        """An SOS frame and its ACK key; resend the same bytes until that ACK arrives."""
        frame, seq = self._frame(
            MsgType.SOS,
            {
                "trigger": int(trigger),
                "status": fmt.status_byte(False, location is not None),
                "battery": battery,
                "terminal_time": int(terminal_time),
                "location": _location_block(location),
            },
        )
        return frame, ("sos", seq)

    def care_answer(self, round_id: int, answer: ev.CareAnswer) -> bytes:
        """A care-check answer."""
        frame, _ = self._frame(MsgType.CARE_ANSWER, {"round_id": round_id, "answer": int(answer)})
        return frame

    def command_ack(self, ref_type: int, ref_seq: int) -> bytes:
        """Confirm a command (care prompt, settings) the server sent."""
        frame, _ = self._frame(
            MsgType.ACK, {"ref_type": ref_type, "ref_seq": ref_seq, "server_time": 0}
        )
        return frame

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Parse server frames into dicts (``type`` is ack, nack, care_prompt or settings)."""
        self._buf += data
        out = []
        while True:
            start = self._buf.find(fmt.MAGIC)
            if start < 0:
                # A lone first magic byte at the end may start the next frame.
                keep = self._buf[-1:] == fmt.MAGIC[:1]
                del self._buf[: len(self._buf) - keep]
                return out
            del self._buf[:start]
            total, reason = check_frame(self._buf, fmt.MAX_PAYLOAD)
            if reason:
                out.append({"type": "error", "reason": reason})
                del self._buf[:2]
                continue
            if not total:
                return out
            frame = bytes(self._buf[:total])
            del self._buf[:total]
            out.append(self.decode(frame))

    @staticmethod
    def decode(frame: bytes) -> dict[str, Any]:
        """Decode one whole server frame."""
        header = fmt.HEADER_C.parse(frame)
        body = fmt.parse_payload(header.type, frame[fmt.HEADER_SIZE : -fmt.TRAILER_SIZE])
        names = {
            MsgType.ACK: "ack",
            MsgType.NACK: "nack",
            MsgType.CARE_PROMPT: "care_prompt",
            MsgType.SETTINGS: "settings",
        }
        kind = names.get(header.type, f"0x{header.type:02x}")
        out: dict[str, Any] = {"type": kind, "seq": header.seq}
        if kind in ("ack", "nack"):
            out["key"] = (_name(MsgType, body.ref_type), body.ref_seq)
            if kind == "ack" and out["key"][0] == "login":
                out["type"] = kind = "login_ack"
            if kind == "nack":
                out["reason"] = _name(ev.Reject, body.reason)
            else:
                out["server_time"] = body.server_time
            if kind == "nack" and out["key"][0] == "login":
                out["type"] = "login_nack"
        elif kind == "care_prompt":
            out.update(round_id=body.round_id, pattern=body.pattern, window_s=body.window_s)
        elif kind == "settings":
            out.update(heartbeat_interval_s=body.heartbeat_interval_s, numbers=list(body.numbers))
        return out
