"""The simulated responders (simulators.responders): script, replies, signed callbacks, CLI."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from dispatch.routing import signing
from simulators import responders
from simulators.responders import (
    BytesProducer,
    ResponderResource,
    ResponderSite,
    ScriptError,
    load_script,
)

ROOT = Path(__file__).resolve().parents[2]
SECRET = b"test-secret"
NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z; verify() needs a realistic "now"
SCRIPT = {
    "13900000001": {"answer": "accept", "after": 2},
    "13900000002": {"answer": "decline", "after": 0},
    "13900000003": {"answer": "never"},
    "13900000004": {"answer": "fail"},
    "*": {"answer": "decline", "after": 1},
}
CALL_FIELDS = {"phone", "incident", "tier", "answer", "type", "attempt"}


# --- fakes ---------------------------------------------------------------------------


@dataclass
class Sent:
    method: bytes
    uri: bytes
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode())
        return values[0].decode() if values else None


class _Collector:
    def __init__(self) -> None:
        self.data: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.data.append(data)


class FakeResponse:
    """Just enough of IResponse for the code under test and readBody()."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.phrase = b"OK"
        self.headers = Headers()
        self.length = 0

    def deliverBody(self, protocol: Any) -> None:
        protocol.connectionLost(Failure(ResponseDone()))


@implementer(IAgent)
class FakeAgent:
    """Records every request; answers with ``code``, or fails with ``error`` when set."""

    def __init__(self, code: int = 200, error: Exception | None = None) -> None:
        self.code = code
        self.error = error
        self.sent: list[Sent] = []

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: Any = None,
    ) -> defer.Deferred[Any]:
        sink = _Collector()
        if bodyProducer is not None:
            bodyProducer.startProducing(sink)
        self.sent.append(Sent(method, uri, headers or Headers(), b"".join(sink.data)))
        if self.error is not None:
            return defer.fail(self.error)
        return defer.succeed(FakeResponse(self.code))


# --- helpers -------------------------------------------------------------------------


def make_call(phone: str = "13900000001", attempt: str = "a3f9", **over: Any) -> dict[str, Any]:
    call: dict[str, Any] = {
        "type": "call",
        "attempt_id": attempt,
        "incident_id": 12,
        "incident_kind": "sos",
        "tier": "family",
        "channel": "voice",
        "phone": phone,
        "name": "王小明",
        "relation": "son",
        "subscriber": {
            "id": 3,
            "name": "王奶奶",
            "address": "xx路1号",
            "district": "鹿城区",
            "location": None,
        },
        "message": "王奶奶按下了求助按钮",
        "callback_url": f"http://127.0.0.1:8080/api/v1/callbacks/{attempt}",
        "expires_at": "2026-01-01T00:05:00Z",
    }
    call.update(over)
    return call


class Rig:
    """A ResponderResource on a task.Clock with a FakeAgent and captured output."""

    def __init__(self, script: dict[str, Any] | None = None, agent: FakeAgent | None = None):
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.agent = agent or FakeAgent()
        self.out = io.StringIO()
        self.resource = ResponderResource(
            SCRIPT if script is None else script, SECRET, self.clock, self.agent, self.out
        )

    def post_raw(
        self, body: bytes, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        req = DummyRequest([b""])
        req.method = b"POST"
        req.content = io.BytesIO(body)
        sign_headers = (
            signing.sign(SECRET, body, int(self.clock.seconds())) if headers is None else headers
        )
        for name, value in sign_headers.items():
            req.requestHeaders.setRawHeaders(name.encode(), [value.encode()])
        req.requestHeaders.setRawHeaders(b"content-type", [b"application/json"])
        req.render(self.resource)
        assert req.finished
        return req.responseCode, json.loads(b"".join(req.written))

    def post(self, call: dict[str, Any], **kw: Any) -> tuple[int, dict[str, Any]]:
        return self.post_raw(json.dumps(call, ensure_ascii=False).encode(), **kw)

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.getvalue().splitlines()]


def assert_signed_callback(sent: Sent, now: float, url: str, answer: str, phone: str) -> None:
    assert sent.method == b"POST"
    assert sent.uri == url.encode()
    assert sent.header("Content-Type") == "application/json"
    reason = signing.verify(
        SECRET,
        sent.body,
        sent.header("X-Dispatch-Timestamp"),
        sent.header("X-Dispatch-Signature"),
        now=now,
        tolerance_s=0,  # signed at the moment it was sent, with the clock it was given
    )
    assert reason is None
    assert json.loads(sent.body) == {"answer": answer, "responder": phone}


# --- in-process behaviour ------------------------------------------------------------


def test_accept_replies_now_and_calls_back_after_delay() -> None:
    """accept after 2 s: 200 at once, the signed callback only once the clock has moved 2 s."""
    rig = Rig()
    call = make_call("13900000001")
    code, reply = rig.post(call)
    assert code == 200 and reply == {"status": "accepted"}
    assert rig.agent.sent == []
    rig.clock.advance(1.9)
    assert rig.agent.sent == []
    rig.clock.advance(0.1)
    assert len(rig.agent.sent) == 1
    assert_signed_callback(
        rig.agent.sent[0], rig.clock.seconds(), call["callback_url"], "accept", "13900000001"
    )
    assert rig.resource.pending() == 0
    assert rig.lines()[-1] == {"callback": "a3f9", "status": 200}


def test_decline_calls_back_with_decline() -> None:
    """decline after 0 s: 200, then a signed decline callback on the next clock tick."""
    rig = Rig()
    call = make_call("13900000002", attempt="b1")
    assert rig.post(call)[0] == 200
    rig.clock.advance(0)
    assert len(rig.agent.sent) == 1
    assert_signed_callback(rig.agent.sent[0], NOW, call["callback_url"], "decline", "13900000002")


def test_never_replies_200_without_callback() -> None:
    """never: the call is accepted (200) and no callback is ever made."""
    rig = Rig()
    assert rig.post(make_call("13900000003"))[0] == 200
    rig.clock.advance(3600)
    assert rig.agent.sent == []
    assert [line["answer"] for line in rig.lines()] == ["never"]


def test_fail_replies_500_every_time() -> None:
    """fail: every call to that number gets a 500 and no callback."""
    rig = Rig()
    for attempt in ("f1", "f2", "f3"):
        code, reply = rig.post(make_call("13900000004", attempt=attempt))
        assert code == 500
        assert reply["error"] == "scripted_failure"
    rig.clock.advance(3600)
    assert rig.agent.sent == []
    assert [line["attempt"] for line in rig.lines()] == ["f1", "f2", "f3"]


def test_unknown_number_uses_star_rule() -> None:
    """A number not in the script follows the "*" entry (here: decline after 1 s)."""
    rig = Rig()
    assert rig.post(make_call("13011112222", attempt="s1"))[0] == 200
    assert rig.lines()[0]["answer"] == "decline"
    rig.clock.advance(1)
    assert json.loads(rig.agent.sent[0].body) == {"answer": "decline", "responder": "13011112222"}


def test_unknown_number_without_star_is_never() -> None:
    """Without a "*" entry an unknown number behaves as never: 200, no callback."""
    rig = Rig(script={"13900000001": {"answer": "accept", "after": 0}})
    assert rig.post(make_call("13011112222"))[0] == 200
    rig.clock.advance(3600)
    assert rig.agent.sent == []
    assert rig.lines()[0]["answer"] == "never"


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"X-Dispatch-Timestamp": str(int(NOW)), "X-Dispatch-Signature": "sha256=00"}, None),
        ({}, "missing_signature"),
        ("wrong-secret", "bad_signature"),
        ("stale", "stale_timestamp"),
    ],
)
def test_bad_signature_is_401_without_callback(headers: Any, reason: str | None) -> None:
    """A call whose signature does not verify gets 401 JSON, a bad_signature line, no callback."""
    rig = Rig()
    call = make_call("13900000001", attempt="x1")
    body = json.dumps(call).encode()
    if headers == "wrong-secret":
        headers = signing.sign(b"other", body, int(NOW))
    elif headers == "stale":
        headers = signing.sign(SECRET, body, int(NOW) - 3600)
    code, reply = rig.post_raw(body, headers=headers)
    assert code == 401
    assert reply["error"] == (reason or "bad_signature")
    rig.clock.advance(3600)
    assert rig.agent.sent == []
    (line,) = rig.lines()
    assert line["answer"] == "bad_signature"
    assert line["reason"] == (reason or "bad_signature")
    # The body is still read for the log line, so an operator can see who it was for.
    assert line["phone"] == "13900000001" and line["attempt"] == "x1"


def test_altered_body_is_rejected() -> None:
    """A body changed after signing is rejected, even though it is valid JSON."""
    rig = Rig()
    body = json.dumps(make_call("13900000001")).encode()
    headers = signing.sign(SECRET, body, int(NOW))
    code, _ = rig.post_raw(body.replace(b"13900000001", b"13900000002"), headers=headers)
    assert code == 401


def test_output_lines_are_json_with_call_fields() -> None:
    """Each call prints one JSON line with phone, incident, tier, answer, type, attempt."""
    rig = Rig()
    rig.post(make_call("13900000001", attempt="o1"))
    rig.post(make_call("13900000002", attempt="o2", type="sms", tier="community"))
    rig.post(make_call("13900000004", attempt="o3", type="relay", tier="relay_120"))
    rig.clock.advance(5)
    lines = rig.lines()
    calls = [line for line in lines if "phone" in line]
    assert calls == [
        {
            "phone": "13900000001",
            "incident": 12,
            "tier": "family",
            "answer": "accept",
            "type": "call",
            "attempt": "o1",
        },
        {
            "phone": "13900000002",
            "incident": 12,
            "tier": "community",
            "answer": "decline",
            "type": "sms",
            "attempt": "o2",
        },
        {
            "phone": "13900000004",
            "incident": 12,
            "tier": "relay_120",
            "answer": "fail",
            "type": "relay",
            "attempt": "o3",
        },
    ]
    assert all(set(c) == CALL_FIELDS for c in calls)
    callbacks = [line for line in lines if "callback" in line]
    assert callbacks == [{"callback": "o2", "status": 200}, {"callback": "o1", "status": 200}]
    assert len(lines) == 5


def test_callback_http_status_is_recorded() -> None:
    """The callback line carries the status the server answered with, not a fixed 200."""
    rig = Rig(agent=FakeAgent(code=409))
    rig.post(make_call("13900000002", attempt="c1"))
    rig.clock.advance(0)
    assert rig.lines()[-1] == {"callback": "c1", "status": 409}


def test_callback_connection_error_is_recorded() -> None:
    """A callback that cannot be delivered prints its error instead of a status."""
    rig = Rig(agent=FakeAgent(error=ConnectionRefusedError("refused")))
    rig.post(make_call("13900000002", attempt="c2"))
    rig.clock.advance(0)
    last = rig.lines()[-1]
    assert last["callback"] == "c2"
    assert isinstance(last["status"], str) and last["status"].startswith("error:")
    assert "ConnectionRefusedError" in last["status"]
    assert rig.resource.pending() == 0


class RaisingAgent(FakeAgent):
    def request(self, *args: Any, **kw: Any) -> defer.Deferred[Any]:
        raise ValueError("bad URI")


def test_agent_raising_synchronously_is_recorded() -> None:
    """An Agent that raises (e.g. on a malformed callback URL) yields an error line, not a crash."""
    rig = Rig(agent=RaisingAgent())
    rig.post(make_call("13900000002", attempt="r1"))
    rig.clock.advance(0)
    assert rig.lines()[-1] == {"callback": "r1", "status": "error: ValueError: bad URI"}
    assert rig.resource.pending() == 0


def test_missing_callback_url_is_reported_not_crashed() -> None:
    """accept with no callback_url: the call is still 200; the line says there was no URL."""
    rig = Rig()
    assert rig.post(make_call("13900000002", attempt="n1", callback_url=None))[0] == 200
    rig.clock.advance(10)
    assert rig.agent.sent == []
    assert rig.lines()[-1] == {"callback": "n1", "status": "no_callback_url"}


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"tier": "family"}'])
def test_signed_but_malformed_body_is_400(body: bytes) -> None:
    """A correctly signed body that is not a call with a phone gets 400, not a 500."""
    rig = Rig()
    code, reply = rig.post_raw(body)
    assert code == 400 and reply["error"] == "bad_request"
    assert rig.lines()[0]["answer"] == "bad_request"


def test_stop_cancels_scheduled_callbacks() -> None:
    """stop() (run at shutdown) cancels callbacks not yet due; nothing is sent later."""
    rig = Rig()
    rig.post(make_call("13900000001"))
    assert rig.resource.pending() == 1
    rig.resource.stop()
    assert rig.resource.pending() == 0
    rig.clock.advance(10)
    assert rig.agent.sent == []


def test_site_serves_the_resource_on_every_path() -> None:
    """ResponderSite wraps one ResponderResource that answers whatever the path."""
    site = ResponderSite(SCRIPT, SECRET, task.Clock(), FakeAgent(), io.StringIO())
    assert isinstance(site.resource, ResponderResource)
    assert site.getResourceFor(DummyRequest([b"any", b"path"])) is site.resource


# --- script loading ------------------------------------------------------------------


def test_load_script_normalises(tmp_path: Path) -> None:
    """A valid script loads with "after" as float seconds, defaulting to 0."""
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"139": {"answer": "accept", "after": 3}, "*": {"answer": "fail"}}))
    assert load_script(str(path)) == {
        "139": {"answer": "accept", "after": 3.0},
        "*": {"answer": "fail", "after": 0.0},
    }


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "cannot read"),
        ("{not json", "not valid JSON"),
        ('["accept"]', "JSON object"),
        ('{"139": "accept"}', "must be an object"),
        ('{"139": {"answer": "maybe"}}', "'maybe'"),
        ('{"139": {"answer": "accept", "after": -1}}', ">= 0"),
        ('{"139": {"answer": "accept", "after": true}}', "number of seconds"),
        ('{"139": {"answer": "accept", "after": "2"}}', "number of seconds"),
        ('{"139": {"answer": "accept", "afer": 2}}', "unknown key"),
    ],
)
def test_load_script_rejects_bad_files(tmp_path: Path, content: str | None, needle: str) -> None:
    """Missing, non-JSON or mis-shaped scripts raise ScriptError naming the problem."""
    path = tmp_path / "s.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ScriptError, match=needle):
        load_script(str(path))


# --- command line --------------------------------------------------------------------


def _run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "simulators.responders", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("content", [None, '{"139": {"answer": "sometimes"}}'])
def test_cli_bad_script_exits_2(tmp_path: Path, content: str | None) -> None:
    """python -m simulators.responders with a missing or invalid script exits 2, saying why."""
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    proc = _run_cli("--port", "0", "--script", str(path))
    assert proc.returncode == 2
    assert "responders:" in proc.stderr and str(path) in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_stops_cleanly_on_signal(tmp_path: Path, sig: signal.Signals) -> None:
    """SIGINT or SIGTERM stops the running simulator with status 0 and no traceback."""
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(SCRIPT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulators.responders", "--port", "0", "--script", str(path)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        assert "listening on" in proc.stderr.readline()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert out == ""


def test_cli_runs_for_duration_and_exits_0(tmp_path: Path) -> None:
    """With a good script it listens (port reported on stderr) and stops after --duration."""
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(SCRIPT))
    proc = _run_cli("--port", "0", "--script", str(path), "--duration", "0.2")
    assert proc.returncode == 0, proc.stderr
    assert "listening on 127.0.0.1:" in proc.stderr
    assert proc.stdout == ""


def test_secret_defaults_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """--secret falls back to $DISPATCH_WEBHOOK_SECRET, then to dev-secret."""
    monkeypatch.setenv("DISPATCH_WEBHOOK_SECRET", "from-env")
    assert responders.parse_args(["--port", "1", "--script", "x"]).secret == "from-env"
    monkeypatch.delenv("DISPATCH_WEBHOOK_SECRET")
    assert responders.parse_args(["--port", "1", "--script", "x"]).secret == "dev-secret"
    assert responders.parse_args(["--port", "1", "--script", "x", "--secret", "s"]).secret == "s"


# --- real loopback -------------------------------------------------------------------


class CallbackReceiver(Resource):
    """Stands in for the server's callback endpoint: verifies and hands over what arrived."""

    isLeaf = True

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.received: defer.Deferred[tuple[bytes, str | None, dict[str, Any]]] = defer.Deferred()

    def render_POST(self, request: Request) -> bytes:
        body = request.content.read()
        ts = request.requestHeaders.getRawHeaders(b"x-dispatch-timestamp", [b""])[0]
        sig = request.requestHeaders.getRawHeaders(b"x-dispatch-signature", [b""])[0]
        reason = signing.verify(SECRET, body, ts.decode(), sig.decode(), self.reactor.seconds())
        if not self.received.called:
            self.received.callback((request.uri, reason, json.loads(body)))
        # 202 rather than 200, so the test can see the real status travel back.
        request.setResponseCode(202 if reason is None else 401)
        return b"{}"


@pytest_twisted.ensureDeferred
async def test_loopback_signed_round_trip() -> None:
    """Over real TCP: a signed call gets 200, and a signed accept is POSTed to callback_url."""
    from twisted.internet import reactor

    receiver = CallbackReceiver(reactor)
    recv_port = reactor.listenTCP(0, Site(receiver), interface="127.0.0.1")
    out = io.StringIO()
    script = {"13900000001": {"answer": "accept", "after": 0.05}}
    site = ResponderSite(script, SECRET, reactor, Agent(reactor), out)
    resp_port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        cb_path = "/api/v1/callbacks/lb1"
        call = make_call(
            "13900000001",
            attempt="lb1",
            callback_url=f"http://127.0.0.1:{recv_port.getHost().port}{cb_path}",
        )
        body = json.dumps(call, ensure_ascii=False).encode()
        headers = Headers({b"Content-Type": [b"application/json"]})
        for name, value in signing.sign(SECRET, body, int(reactor.seconds())).items():
            headers.setRawHeaders(name.encode(), [value.encode()])
        url = f"http://127.0.0.1:{resp_port.getHost().port}/hook".encode()

        response = (
            await Agent(reactor)
            .request(b"POST", url, headers, BytesProducer(body))
            .addTimeout(5, reactor)
        )
        assert response.code == 200
        reply = await responders.read_body(response).addTimeout(5, reactor)
        assert json.loads(reply) == {"status": "accepted"}

        uri, reason, answer = await receiver.received.addTimeout(5, reactor)
        assert uri == cb_path.encode()
        assert reason is None
        assert answer == {"answer": "accept", "responder": "13900000001"}

        await site.resource.drain().addTimeout(5, reactor)
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        assert lines == [
            {
                "phone": "13900000001",
                "incident": 12,
                "tier": "family",
                "answer": "accept",
                "type": "call",
                "attempt": "lb1",
            },
            {"callback": "lb1", "status": 202},
        ]
    finally:
        site.resource.stop()
        await resp_port.stopListening()
        await recv_port.stopListening()
