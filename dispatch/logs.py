"""structlog setup: JSON off a terminal, readable on one, personal data masked."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# Fields that may hold personal data; their values are masked in every log event.
PERSONAL = frozenset({"name", "phone", "id_number", "address", "ident", "contact", "imei"})


def mask(value: Any) -> str:
    """Keep just enough to correlate (last 4 characters), hide the rest."""
    text = str(value)
    if len(text) <= 4:
        return "*" * len(text)
    return "*" * (len(text) - 4) + text[-4:]


def mask_personal(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
    """structlog processor masking the PERSONAL fields."""
    for key in PERSONAL.intersection(event):
        if event[key] is not None:
            event[key] = mask(event[key])
    return event


def configure(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Configure structlog once for the process."""
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            mask_personal,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )


def get(name: str) -> Any:
    """A bound logger for a module."""
    return structlog.get_logger(name)
