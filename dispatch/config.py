"""Configuration: defaults < config file < DISPATCH_* environment < command-line flags.

The config file is TOML, named by ``--config`` or ``DISPATCH_CONFIG``; its keys
are the flag names with underscores (``native_port = 7700``).  See docs/config.md.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A configuration value is missing, malformed or out of range."""


@dataclass
class Config:
    """Every setting of ``dispatch serve``; field names are the flag names."""

    db: str = "sqlite:///dispatch.db"
    host: str = "127.0.0.1"
    native_port: int = 7700
    gt06_port: int = 7701
    jt808_port: int = 7702
    http_port: int = 8080
    webhook_url: str = ""
    webhook_secret: str = ""
    public_url: str = ""
    relay_110: str = "110"
    relay_120: str = "120"
    low_battery: int = 20
    offline_incident_after: float = 7200.0
    inactivity_days: float = 7.0
    heartbeat_interval: int = 60
    offline_after: int = 3
    flush_interval: float = 2.0
    sos_dedup_hours: float = 24.0
    udp_rate: float = 20.0
    db_threads: int = 4
    log_level: str = "info"
    log_format: str = "auto"

    def validate(self) -> Config:
        """Check ranges; raise ConfigError with the offending setting named."""
        for name in ("native_port", "gt06_port", "jt808_port", "http_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"{name} must be 0-65535 (0 disables), got {port}")
        if not 1 <= self.low_battery <= 99:
            raise ConfigError(f"low_battery must be 1-99 (percent), got {self.low_battery}")
        positive = (
            "offline_incident_after",
            "inactivity_days",
            "heartbeat_interval",
            "offline_after",
            "flush_interval",
            "sos_dedup_hours",
            "udp_rate",
            "db_threads",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.webhook_url and not self.webhook_secret:
            raise ConfigError("webhook_secret is required with webhook_url (calls are signed)")
        if self.webhook_url and not self.webhook_url.startswith(("http://", "https://")):
            raise ConfigError("webhook_url must be an http:// or https:// URL")
        if self.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise ConfigError("log_level must be debug, info, warning, error or critical")
        if self.log_format not in ("auto", "json", "console"):
            raise ConfigError("log_format must be auto, json or console")
        return self


FIELD_TYPES = {f.name: f.type for f in fields(Config)}
_CAST = {"int": int, "float": float, "str": str}


def _cast(name: str, value: Any, source: str) -> Any:
    kind = FIELD_TYPES[name]
    # Typed sources (TOML) must already have the right type: 7700.5 or true is a mistake.
    if not isinstance(value, str) and (
        isinstance(value, bool)
        or (kind == "int" and not isinstance(value, int))
        or (kind == "float" and not isinstance(value, int | float))
    ):
        raise ConfigError(f"{source}: {name} must be {kind}, got {value!r}")
    try:
        return _CAST[kind](value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {name} must be {kind}, got {value!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting; defaults are None so unset flags do not override."""
    parser.add_argument("--config", help="TOML config file (env DISPATCH_CONFIG)")
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(
            flag,
            dest=f.name,
            default=None,
            type=_CAST[f.type],
            help=f"default {f.default!r}; env DISPATCH_{f.name.upper()}",
        )


def load(args: argparse.Namespace | None = None, env: dict[str, str] | None = None) -> Config:
    """Resolve the configuration from file, environment and parsed flags."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = getattr(args, "config", None) or env.get("DISPATCH_CONFIG")
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in FIELD_TYPES:
                raise ConfigError(f"config file {path}: unknown setting {key!r}")
            values[name] = _cast(name, value, f"config file {path}")
    for name in FIELD_TYPES:
        raw = env.get(f"DISPATCH_{name.upper()}")
        if raw is not None:
            values[name] = _cast(name, raw, f"DISPATCH_{name.upper()}")
    for name in FIELD_TYPES:
        value = getattr(args, name, None) if args is not None else None
        if value is not None:
            values[name] = value
    return Config(**values).validate()
