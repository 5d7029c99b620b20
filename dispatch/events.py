"""Typed terminal events: the one model every wire protocol decodes into.

Protocol modules turn bytes into these; the gateway and routing layers consume
them and never learn which protocol a terminal speaks.  Server-to-terminal
commands live here too, so routing can ask for a care prompt without knowing
how each protocol encodes one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class SosTrigger(enum.IntEnum):
    """Why a terminal raised an alarm."""

    BUTTON = 1
    FALL = 2
    OTHER = 3


class CareAnswer(enum.IntEnum):
    """A subscriber's answer to a care-check prompt."""

    OK = 1
    HELP = 2
    NO_INPUT = 3


class Reject(enum.IntEnum):
    """Why the server refused a frame; native NACK reason codes use these values."""

    NOT_LOGGED_IN = 1
    UNKNOWN_DEVICE = 2
    UNSUPPORTED_TYPE = 3
    MALFORMED = 4
    TRY_LATER = 5
    UNSUPPORTED_VERSION = 6


@dataclass(frozen=True, slots=True)
class Location:
    """A position in WGS-84 degrees; accuracy in metres when the terminal knows it."""

    lat: float
    lon: float
    accuracy_m: int | None = None
    source: str = "gps"


@dataclass(frozen=True, slots=True)
class Login:
    """A terminal announces itself; binds the connection to a known device."""

    ident: str
    firmware: str = ""
    protocol_version: int = 1
    auth_code: str | None = None


@dataclass(frozen=True, slots=True)
class Register:
    """A terminal asks to be registered and given an authentication code (JT/T 808)."""

    ident: str
    maker: str = ""
    model: str = ""
    terminal_id: str = ""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Periodic liveness with power and radio state (battery/signal in percent, None if unknown)."""

    ident: str
    battery: int | None = None
    charging: bool = False
    signal: int | None = None
    location: Location | None = None


@dataclass(frozen=True, slots=True)
class Sos:
    """An alarm: the button, a detected fall, or another alarm the terminal raised.

    ``seq`` is the terminal's frame sequence number; a resent alarm carries the
    same one, which is how the server tells a retransmission from a new press.
    """

    ident: str
    seq: int
    trigger: SosTrigger = SosTrigger.BUTTON
    location: Location | None = None
    terminal_time: float | None = None
    battery: int | None = None


@dataclass(frozen=True, slots=True)
class LocationReport:
    """A position report that is not an alarm."""

    ident: str
    location: Location


@dataclass(frozen=True, slots=True)
class CareCheckAnswer:
    """The subscriber answered (or failed to answer) a care-check prompt."""

    ident: str
    round_id: int
    answer: CareAnswer


@dataclass(frozen=True, slots=True)
class CommandAck:
    """The terminal confirms it carried out a command we sent."""

    ident: str
    ref_seq: int
    ok: bool = True


@dataclass(frozen=True, slots=True)
class Logout:
    """The terminal says goodbye before disconnecting."""

    ident: str


@dataclass(frozen=True, slots=True)
class DeviceAlarm:
    """A non-emergency condition the terminal reports (power cut, low battery, tamper...)."""

    ident: str
    alarm: str
    location: Location | None = None


TerminalEvent = (
    Login
    | Register
    | Heartbeat
    | Sos
    | LocationReport
    | CareCheckAnswer
    | CommandAck
    | Logout
    | DeviceAlarm
)


# --- server -> terminal commands -------------------------------------------------


@dataclass(frozen=True, slots=True)
class CarePrompt:
    """Ask the subscriber whether they are all right."""

    round_id: int
    pattern: int = 3  # 1 ring, 2 voice, 3 ring then voice
    window_s: int = 300


@dataclass(frozen=True, slots=True)
class Settings:
    """Push the heartbeat interval and the numbers the terminal may dial itself."""

    heartbeat_interval_s: int
    contact_numbers: tuple[str, ...] = field(default_factory=tuple)


Command = CarePrompt | Settings
