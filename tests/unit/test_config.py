"""Configuration: defaults < TOML file < DISPATCH_* environment < flags, and validation."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from dispatch import config
from dispatch.config import Config, ConfigError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def toml(tmp_path: Path):
    """Write a TOML config file and return its path as a string."""

    def write(text: str) -> str:
        path = tmp_path / "dispatch.toml"
        path.write_text(text)
        return str(path)

    return write


def test_defaults_without_any_source() -> None:
    """With no file, environment or flags every setting has its documented default."""
    assert config.load(parse(), env={}) == Config()
    assert Config().native_port == 7700 and Config().heartbeat_interval == 60


def test_file_overrides_defaults(toml) -> None:
    """A setting in the TOML file replaces the default; the others keep theirs."""
    path = toml(
        'native_port = 7800\nflush_interval = 0.5\nwebhook_url = "http://x/hook"\n'
        'webhook_secret = "s"\n'
    )
    cfg = config.load(parse("--config", path), env={})
    assert (cfg.native_port, cfg.flush_interval, cfg.webhook_url) == (7800, 0.5, "http://x/hook")
    assert cfg.gt06_port == 7701


def test_file_named_by_environment(toml) -> None:
    """DISPATCH_CONFIG names the file when --config is not given."""
    path = toml("http_port = 9090\n")
    assert config.load(parse(), env={"DISPATCH_CONFIG": path}).http_port == 9090


def test_file_keys_may_use_dashes(toml) -> None:
    """File keys may be spelled like flags (native-port) as well as with underscores."""
    assert config.load(parse("--config", toml("native-port = 7801\n")), env={}).native_port == 7801


def test_environment_overrides_file(toml) -> None:
    """DISPATCH_* variables win over the config file."""
    path = toml("native_port = 7800\nheartbeat_interval = 30\n")
    cfg = config.load(parse("--config", path), env={"DISPATCH_NATIVE_PORT": "7900"})
    assert cfg.native_port == 7900
    assert cfg.heartbeat_interval == 30


def test_flags_override_environment_and_file(toml) -> None:
    """A command-line flag wins over both the environment and the file."""
    path = toml("native_port = 7800\n")
    args = parse("--config", path, "--native-port", "7950", "--flush-interval", "1.5")
    env = {"DISPATCH_NATIVE_PORT": "7900", "DISPATCH_FLUSH_INTERVAL": "3"}
    cfg = config.load(args, env=env)
    assert (cfg.native_port, cfg.flush_interval) == (7950, 1.5)


def test_unset_flags_do_not_override() -> None:
    """Flags left out do not reset values that came from the environment."""
    cfg = config.load(parse("--http-port", "1"), env={"DISPATCH_DB": "sqlite:///x.db"})
    assert cfg.db == "sqlite:///x.db" and cfg.http_port == 1


def test_environment_values_are_typed() -> None:
    """Environment strings are converted to each setting's type."""
    env = {"DISPATCH_OFFLINE_AFTER": "5", "DISPATCH_UDP_RATE": "7.5", "DISPATCH_HOST": "0.0.0.0"}
    cfg = config.load(parse(), env=env)
    assert (cfg.offline_after, cfg.udp_rate, cfg.host) == (5, 7.5, "0.0.0.0")


def test_bad_environment_value_names_the_setting() -> None:
    """A value that is not of the setting's type is a ConfigError naming setting and source."""
    with pytest.raises(ConfigError) as err:
        config.load(parse(), env={"DISPATCH_HEARTBEAT_INTERVAL": "often"})
    assert "heartbeat_interval" in str(err.value)
    assert "DISPATCH_HEARTBEAT_INTERVAL" in str(err.value)


def test_bad_file_value_names_the_setting(toml) -> None:
    """A mistyped value in the file is a ConfigError naming the setting and the file."""
    path = toml('udp_rate = "fast"\n')
    with pytest.raises(ConfigError, match="udp_rate") as err:
        config.load(parse("--config", path), env={})
    assert path in str(err.value)


def test_unknown_file_key_refused(toml) -> None:
    """A key the server does not know (a typo) in the file is refused, not ignored."""
    with pytest.raises(ConfigError, match="heartbeat_intervall"):
        config.load(parse("--config", toml("heartbeat_intervall = 30\n")), env={})


def test_broken_toml_refused(toml) -> None:
    """A file that is not valid TOML is a ConfigError naming the file."""
    path = toml("native_port = \n")
    with pytest.raises(ConfigError, match="config file"):
        config.load(parse("--config", path), env={})


def test_missing_file_refused(tmp_path: Path) -> None:
    """A config file that does not exist is a ConfigError, not a silent default."""
    with pytest.raises(ConfigError, match="nope.toml"):
        config.load(parse("--config", str(tmp_path / "nope.toml")), env={})


def test_port_zero_allowed() -> None:
    """Port 0 is accepted (it disables that listener)."""
    cfg = config.load(parse("--gt06-port", "0"), env={"DISPATCH_HTTP_PORT": "0"})
    assert (cfg.gt06_port, cfg.http_port) == (0, 0)


@pytest.mark.parametrize("port", ["-1", "65536"])
def test_port_out_of_range_refused(port: str) -> None:
    """A port outside 0-65535 is a ConfigError naming the port setting."""
    with pytest.raises(ConfigError, match="jt808_port"):
        config.load(parse(), env={"DISPATCH_JT808_PORT": port})


@pytest.mark.parametrize(
    "name",
    ["heartbeat_interval", "offline_after", "flush_interval", "sos_dedup_hours", "udp_rate"],
)
def test_negative_or_zero_interval_refused(name: str) -> None:
    """Intervals, counts and rates must be positive; zero or negative names the setting."""
    for value in ("-5", "0"):
        with pytest.raises(ConfigError, match=name):
            config.load(parse(), env={f"DISPATCH_{name.upper()}": value})


def test_negative_flag_refused() -> None:
    """A negative interval given as a flag is refused like one from the environment."""
    with pytest.raises(ConfigError, match="heartbeat_interval"):
        config.load(parse("--heartbeat-interval", "-60"), env={})


def test_bad_log_format_refused() -> None:
    """log_format must be auto, json or console."""
    with pytest.raises(ConfigError, match="log_format"):
        config.load(parse(), env={"DISPATCH_LOG_FORMAT": "xml"})


def test_bad_log_level_refused() -> None:
    """An unknown log_level is a ConfigError naming the setting, not a crash at startup."""
    with pytest.raises(ConfigError, match="log_level"):
        config.load(parse(), env={"DISPATCH_LOG_LEVEL": "verbose"})


@pytest.mark.parametrize("value", ["7700.5", "true"])
def test_non_integer_file_value_for_port_refused(toml, value: str) -> None:
    """A TOML float or boolean for an integer setting is refused, not silently truncated."""
    with pytest.raises(ConfigError, match="native_port"):
        config.load(parse("--config", toml(f"native_port = {value}\n")), env={})


def test_webhook_url_needs_a_secret() -> None:
    """A webhook URL without a signing secret is refused: unsigned calls could be forged."""
    with pytest.raises(ConfigError, match="webhook_secret"):
        config.load(parse("--webhook-url", "http://127.0.0.1:9/hook"), env={})
    cfg = config.load(
        parse("--webhook-url", "http://127.0.0.1:9/hook", "--webhook-secret", "s"), env={}
    )
    assert cfg.webhook_secret == "s"
