"""Start the real server on loopback and drive it with simulators and HTTP."""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import treq
from twisted.internet import defer, reactor, task, utils

from dispatch.app import DispatchApp
from dispatch.config import Config
from dispatch.store import tokens

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def wait(d: defer.Deferred, seconds: float = 30.0) -> defer.Deferred:
    """Bound any wait: pytest-twisted has no per-test timeout."""
    return d.addTimeout(seconds, reactor)


def sleep(seconds: float) -> defer.Deferred:
    """Let the reactor run for a while."""
    return task.deferLater(reactor, seconds, lambda: None)


@dataclass
class Server:
    """A running DispatchApp and what tests need to talk to it."""

    app: DispatchApp
    token: str
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    async def get(self, path: str, token: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        resp = await wait(treq.get(self.base + path, headers=headers))
        return resp.code, json.loads(await wait(resp.content()))

    async def post(self, path: str, body: Any, token: str | None = None) -> tuple[int, Any]:
        headers = {
            "Authorization": f"Bearer {token or self.token}",
            "Content-Type": "application/json",
        }
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        resp = await wait(treq.post(self.base + path, data=data, headers=headers))
        return resp.code, json.loads(await wait(resp.content()))

    async def subscriber(self, ident: str, protocol: str = "native", **extra: Any) -> int:
        body = {
            "name": "王奶奶",
            "district": "鹿城区",
            "address": "五马街1号",
            "contacts": [
                {"name": "王小明", "phone": "13900000001", "relation": "son"},
                {
                    "name": "社区李",
                    "phone": "13900000002",
                    "relation": "worker",
                    "tier": "community",
                },
            ],
            "device": {"protocol": protocol, "ident": ident},
            **extra,
        }
        code, created = await self.post("/api/v1/subscribers", body)
        assert code == 201, created
        return created["id"]

    async def metric(self, name: str, **labels: str) -> float:
        """Read one sample from /metrics as Prometheus would."""
        resp = await wait(treq.get(self.base + "/metrics"))
        text = (await wait(resp.content())).decode()
        want = name + (
            "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else ""
        )
        for line in text.splitlines():
            if line.startswith(want + " "):
                return float(line.split()[-1])
        return 0.0


def config(db_url: str, **overrides: Any) -> Config:
    return Config(**{"db": db_url, "host": "127.0.0.1", "webhook_url": "", **overrides})


async def start_server(db_url: str, ports: dict[str, int] | None = None, **overrides: Any):
    """Start the app; listeners on OS-chosen ports unless ``ports`` pins them."""
    cfg = config(db_url, **{f"{k}_port": v for k, v in (ports or {}).items()}, **overrides)
    any_port = frozenset({"native", "gt06", "jt808", "http"} - set(ports or {}))
    app = DispatchApp(cfg, reactor, any_port=any_port)
    await wait(defer.ensureDeferred(app.start()))
    session = app.db.session_sync()
    with session, session.begin():
        token = tokens.create_token(session, "admin", "test-admin", None, datetime.now(UTC))
    return Server(app, token, dict(app.ports))


async def stop_server(server: Server) -> None:
    await wait(defer.ensureDeferred(server.app.stop()))


async def run_terminal(*args: str, timeout: float = 60.0) -> tuple[int, list[dict[str, Any]]]:
    """Run ``python -m simulators.terminal`` and return its exit code and JSON lines."""
    out, err, code = await wait(
        utils.getProcessOutputAndValue(
            sys.executable,
            ["-m", "simulators.terminal", *args],
            env=dict(os.environ),
            path=ROOT,
        ),
        timeout,
    )
    lines = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    assert not err.strip() or b"Traceback" not in err, err.decode()
    return code, lines


class RawClient:
    """A blocking-free raw TCP client for byte-level tests."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.setblocking(False)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    async def recv(self, seconds: float = 2.0) -> bytes:
        """Collect what arrives within ``seconds`` (returns early on close)."""
        chunks = []
        deadline = reactor.seconds() + seconds
        while reactor.seconds() < deadline:
            try:
                chunk = self.sock.recv(65536)
                if not chunk:
                    self.closed = True
                    break
                chunks.append(chunk)
            except BlockingIOError:
                await sleep(0.02)
        return b"".join(chunks)

    closed = False

    async def is_closed(self, seconds: float = 3.0) -> bool:
        await self.recv(seconds)
        return self.closed

    def close(self) -> None:
        self.sock.close()


SECRET = "test-secret"


class LineCollector:
    """A ProcessProtocol that keeps stdout JSON lines and stderr text of a child."""

    def __init__(self) -> None:
        from twisted.internet import protocol

        collector = self

        class _Proto(protocol.ProcessProtocol):
            def outReceived(self, data: bytes) -> None:
                collector._out += data
                *whole, collector._out = collector._out.split(b"\n")
                for line in whole:
                    if line.startswith(b"{"):
                        collector.lines.append(json.loads(line))

            def errReceived(self, data: bytes) -> None:
                collector.err += data

            def processEnded(self, reason: Any) -> None:
                collector.ended.callback(getattr(reason.value, "exitCode", None))

        self.lines: list[dict[str, Any]] = []
        self.err = b""
        self._out = b""
        self.ended: defer.Deferred = defer.Deferred()
        self.protocol = _Proto()
        self.transport: Any = None

    def spawn(self, args: list[str], env: dict[str, str] | None = None) -> LineCollector:
        self.transport = reactor.spawnProcess(
            self.protocol,
            sys.executable,
            [sys.executable, *args],
            env={**os.environ, **(env or {})},
            path=ROOT,
        )
        return self

    async def wait_for(self, predicate: Any, seconds: float = 20.0) -> list[dict[str, Any]]:
        """Wait until some collected lines satisfy ``predicate``; returns those lines."""
        deadline = reactor.seconds() + seconds
        while reactor.seconds() < deadline:
            found = [line for line in self.lines if predicate(line)]
            if found:
                return found
            await sleep(0.05)
        raise AssertionError(f"timed out; lines so far: {self.lines} stderr: {self.err[-2000:]}")

    async def stop(self, sig: str = "TERM") -> None:
        if not self.ended.called:
            self.transport.signalProcess(sig)
            await wait(self.ended, 20)


def free_port() -> int:
    """A port free right now on 127.0.0.1 (for children that need one before they start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_responders(tmp_path: Any, script: dict[str, Any]) -> tuple[LineCollector, int]:
    """Run simulators.responders with ``script``; returns the collector and its port."""
    path = tmp_path / "responders.json"
    path.write_text(json.dumps(script))
    port = free_port()
    proc = LineCollector().spawn(
        [
            "-m",
            "simulators.responders",
            "--port",
            str(port),
            "--script",
            str(path),
            "--secret",
            SECRET,
            "--duration",
            "120",
        ]
    )
    deadline = reactor.seconds() + 15
    while b"listening" not in proc.err:
        if reactor.seconds() > deadline or proc.ended.called:
            raise AssertionError(f"responders did not start: {proc.err.decode()}")
        await sleep(0.05)
    return proc, port
