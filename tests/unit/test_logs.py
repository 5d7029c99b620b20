"""Logging: personal data is masked, output is JSON off a terminal."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
import structlog

from dispatch import logs


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the process-wide structlog configuration back after a test reconfigures it."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def configured(stream: io.StringIO, level: str = "info", fmt: str = "auto") -> object:
    """Configure logging onto ``stream`` and return a fresh logger bound to it."""
    logs.configure(level, fmt, stream)
    return logs.get("tests.logs")


class TtyStream(io.StringIO):
    """A StringIO that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


def test_mask_keeps_last_four_characters() -> None:
    """mask hides all but the last 4 characters, and hides short values entirely."""
    assert logs.mask("13800138000") == "*******8000"
    assert logs.mask("abcd") == "****"
    assert logs.mask("ab") == "**"
    assert logs.mask(860000000000001) == "***********0001"


def test_processor_masks_personal_fields() -> None:
    """name, phone, id_number and ident are masked to their last 4 characters."""
    event = {
        "event": "login",
        "name": "Wang Fang Zhou",
        "phone": "+8613800138000",
        "id_number": "11010519491231002X",
        "ident": "860000000000001",
    }
    out = logs.mask_personal(None, "info", dict(event))
    assert out["name"] == "**********Zhou"
    assert out["phone"] == "**********8000"
    assert out["id_number"] == "**************002X"
    assert out["ident"] == "***********0001"
    assert out["event"] == "login"


def test_processor_leaves_other_fields_alone() -> None:
    """Fields that are not personal, and personal fields that are None, pass unchanged."""
    event = {
        "event": "sos",
        "seq": 12345678,
        "peer": "10.0.0.7:40000",
        "incident": 42,
        "protocol": "native",
        "phone": None,
    }
    assert logs.mask_personal(None, "warning", dict(event)) == event


def test_json_output_when_stream_is_not_a_tty(restore_logging) -> None:
    """Off a terminal each event is one JSON line with level, timestamp and masked fields."""
    stream = io.StringIO()
    log = configured(stream)
    log.warning("sos", ident="860000000000001", seq=7, incident=3)
    [line] = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["event"] == "sos"
    assert record["level"] == "warning"
    assert record["ident"] == "***********0001"
    assert (record["seq"], record["incident"]) == (7, 3)
    assert record["timestamp"].endswith("Z")


def test_console_output_on_a_tty(restore_logging) -> None:
    """On a terminal the output is human-readable, not JSON, and still masked."""
    stream = TtyStream()
    log = configured(stream)
    log.info("login", phone="13800138000")
    text = stream.getvalue()
    assert "login" in text
    assert "13800138000" not in text and "8000" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


def test_json_forced_on_a_tty(restore_logging) -> None:
    """fmt='json' gives JSON even on a terminal."""
    stream = TtyStream()
    configured(stream, fmt="json").info("hello")
    assert json.loads(stream.getvalue())["event"] == "hello"


def test_level_filters_lower_events(restore_logging) -> None:
    """Events below the configured level are not written."""
    stream = io.StringIO()
    log = configured(stream, level="warning")
    log.info("quiet")
    log.error("loud")
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == ["loud"]
