"""The `dispatch` console script as an operator runs it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.integration.harness import ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dispatch(
    *args: str, env: dict | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dispatch", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def test_token_create_prints_only_the_token(sqlite_url):
    """`dispatch token create` prints one token line and nothing else on stdout."""
    result = _dispatch(
        "token", "create", "--role", "operator", "--name", "night", "--db", sqlite_url
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsp_") and len(lines[0]) > 30


def test_bad_config_exits_2_with_the_setting_named(sqlite_url, tmp_path):
    """A malformed environment value or config file stops with status 2 and says which."""
    result = _dispatch("serve", "--db", sqlite_url, env={"DISPATCH_NATIVE_PORT": "seven"})
    assert result.returncode == 2 and "DISPATCH_NATIVE_PORT" in result.stderr
    cfg = tmp_path / "d.toml"
    cfg.write_text("natve_port = 1\n")
    result = _dispatch("serve", "--config", str(cfg))
    assert result.returncode == 2 and "natve_port" in result.stderr


def test_serve_runs_until_sigterm(sqlite_url):
    """`dispatch serve` answers /healthz, takes settings from env, and exits 0 on SIGTERM."""
    http, native = _free_port(), _free_port()
    env = {**os.environ, "DISPATCH_HTTP_PORT": str(http), "DISPATCH_DB": sqlite_url}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dispatch",
            "serve",
            "--native-port",
            str(native),
            "--gt06-port",
            "0",
            "--jt808-port",
            "0",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz", timeout=1) as r:
                    assert json.loads(r.read())["status"] == "ok"
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("serve did not come up within 30 s")
                time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", native), timeout=2):
            pass
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        events = [
            json.loads(line)["event"]
            for line in proc.stderr.read().splitlines()
            if line.startswith("{")
        ]
        assert "serving" in events
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
