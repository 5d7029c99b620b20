"""Notification channels: the signed webhook with retries and timeouts, and the log fallback.

The webhook channel is driven with a fake HTTP agent whose Deferreds the test
fires by hand and a :class:`twisted.internet.task.Clock` as its reactor, so
backoff and timeouts happen exactly when the clock is advanced.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from dispatch.routing import signing
from dispatch.routing.channels import CallRequest, LogChannel, WebhookChannel

SECRET = b"webhook-secret"
URL = "http://provider.example/hook"
START = 1_800_000_000.0


def result_of(d: defer.Deferred[Any]) -> Any:
    """The result of an already-fired Deferred (re-raising a failure)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def make_request(**kw: Any) -> CallRequest:
    """A realistic family voice call request."""
    fields: dict[str, Any] = {
        "type": "call",
        "attempt_id": "a1b2c3",
        "incident_id": 7,
        "incident_kind": "sos",
        "tier": "family",
        "channel": "voice",
        "phone": "13900000001",
        "name": "Li Wei",
        "relation": "son",
        "subscriber": {"name": "王芳", "address": "1 Wuma Street"},
        "message": "王芳 pressed the emergency button at 1 Wuma Street.",
        "callback_url": "http://cb/api/v1/callbacks/a1b2c3",
        "expires_at": "2027-01-15T09:00:00+00:00",
    }
    fields.update(kw)
    return CallRequest(**fields)


class FakeResponse:
    """An IResponse look-alike; ``body=None`` means the body never finishes arriving."""

    def __init__(self, code: int, body: bytes | None = b"ok") -> None:
        self.code = code
        self.phrase = b"status"
        self.body = body

    def deliverBody(self, protocol: Any) -> None:  # noqa: N802 (Twisted's interface name)
        if self.body is None:
            return
        protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))


@dataclass
class Sent:
    """One request made through the fake agent."""

    method: bytes
    url: bytes
    headers: Any
    producer: Any
    deferred: defer.Deferred[Any]

    def body(self) -> bytes:
        # FileBodyProducer keeps the file it was given; reading it avoids a cooperator.
        return self.producer._inputFile.getvalue()

    def header(self, name: str) -> str:
        values = self.headers.getRawHeaders(name.encode())
        assert values and len(values) == 1, name
        return values[0].decode()


class FakeAgent:
    """An Agent whose responses the test supplies through each request's Deferred."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []

    def request(
        self, method: bytes, url: bytes, headers: Any = None, bodyProducer: Any = None
    ) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.sent.append(Sent(method, url, headers, bodyProducer, d))
        return d


@pytest.fixture
def clock() -> task.Clock:
    """A clock at a realistic epoch (2027-01-15 08:00 UTC)."""
    c = task.Clock()
    c.advance(START)
    return c


@pytest.fixture
def agent() -> FakeAgent:
    """A fresh fake agent."""
    return FakeAgent()


def channel(clock: task.Clock, agent: FakeAgent, **kw: Any) -> WebhookChannel:
    """A webhook channel on the test clock and fake agent."""
    return WebhookChannel(clock, URL, SECRET, agent=agent, **kw)


def test_200_is_success_after_one_signed_request(clock: task.Clock, agent: FakeAgent) -> None:
    """A 2xx answer fires True after exactly one POST of the signed CallRequest JSON."""
    request = make_request()
    d = channel(clock, agent).send(request)
    assert not d.called
    assert len(agent.sent) == 1
    sent = agent.sent[0]
    assert sent.method == b"POST"
    assert sent.url == URL.encode()
    assert sent.header("content-type") == "application/json"
    assert sent.body() == request.body()
    assert json.loads(sent.body()) == asdict(request)
    assert sent.producer.length == len(request.body())
    assert sent.header(signing.TIMESTAMP_HEADER) == str(int(START))
    verdict = signing.verify(
        SECRET,
        sent.body(),
        sent.header(signing.TIMESTAMP_HEADER),
        sent.header(signing.SIGNATURE_HEADER),
        now=clock.seconds(),
    )
    assert verdict is None
    sent.deferred.callback(FakeResponse(200))
    assert result_of(d) is True
    assert len(agent.sent) == 1


def test_body_keeps_chinese_text_readable(clock: task.Clock, agent: FakeAgent) -> None:
    """The webhook body is UTF-8 JSON with Chinese names as text, not \\u escapes."""
    channel(clock, agent).send(make_request())
    assert "王芳".encode() in agent.sent[0].body()


def test_500_then_200_retries_after_backoff(clock: task.Clock, agent: FakeAgent) -> None:
    """A 5xx is retried after backoff_s (not before) and the retry's success is True."""
    d = channel(clock, agent, backoff_s=0.5).send(make_request())
    agent.sent[0].deferred.callback(FakeResponse(500, b"oops"))
    assert not d.called
    clock.advance(0.49)
    assert len(agent.sent) == 1
    clock.advance(0.01)
    assert len(agent.sent) == 2
    assert agent.sent[1].body() == agent.sent[0].body()
    agent.sent[1].deferred.callback(FakeResponse(200))
    assert result_of(d) is True


def test_three_500s_give_false_with_doubling_backoff(clock: task.Clock, agent: FakeAgent) -> None:
    """Three failed tries (backoff 0.5 s then 1 s) fire False and no fourth POST is made."""
    d = channel(clock, agent, retries=3, backoff_s=0.5).send(make_request())
    agent.sent[0].deferred.callback(FakeResponse(500))
    clock.advance(0.5)
    agent.sent[1].deferred.callback(FakeResponse(503))
    clock.advance(0.99)
    assert len(agent.sent) == 2
    clock.advance(0.01)
    assert len(agent.sent) == 3
    agent.sent[2].deferred.callback(FakeResponse(502))
    assert result_of(d) is False
    clock.advance(60)
    assert len(agent.sent) == 3


def test_retry_is_signed_with_its_own_timestamp(clock: task.Clock, agent: FakeAgent) -> None:
    """Each retry carries the timestamp of when it is sent and still verifies."""
    channel(clock, agent, backoff_s=2.0).send(make_request())
    agent.sent[0].deferred.callback(FakeResponse(500))
    clock.advance(2.0)
    retry = agent.sent[1]
    assert retry.header(signing.TIMESTAMP_HEADER) == str(int(START + 2))
    verdict = signing.verify(
        SECRET,
        retry.body(),
        retry.header(signing.TIMESTAMP_HEADER),
        retry.header(signing.SIGNATURE_HEADER),
        now=clock.seconds(),
    )
    assert verdict is None


def test_hanging_request_times_out_and_is_retried(clock: task.Clock, agent: FakeAgent) -> None:
    """A POST that never answers is cancelled at timeout_s and retried after the backoff."""
    d = channel(clock, agent, timeout_s=5.0, backoff_s=0.5).send(make_request())
    clock.advance(4.9)
    assert not agent.sent[0].deferred.called
    assert len(agent.sent) == 1
    clock.advance(0.1)
    assert agent.sent[0].deferred.called  # cancelled by the timeout
    assert len(agent.sent) == 1
    clock.advance(0.5)
    assert len(agent.sent) == 2
    agent.sent[1].deferred.callback(FakeResponse(200))
    assert result_of(d) is True


def test_body_that_never_ends_times_out(clock: task.Clock, agent: FakeAgent) -> None:
    """A response whose body never finishes counts as a failure after timeout_s and is retried."""
    d = channel(clock, agent, timeout_s=5.0, backoff_s=0.5).send(make_request())
    agent.sent[0].deferred.callback(FakeResponse(200, body=None))
    assert not d.called
    clock.advance(5.0)
    clock.advance(0.5)
    assert len(agent.sent) == 2
    agent.sent[1].deferred.callback(FakeResponse(200))
    assert result_of(d) is True


def test_refused_connection_is_a_failure(clock: task.Clock, agent: FakeAgent) -> None:
    """An agent error (e.g. connection refused) on every try fires False, not an exception."""
    d = channel(clock, agent, retries=2, backoff_s=0.5).send(make_request())
    agent.sent[0].deferred.errback(ConnectionRefusedError("refused"))
    clock.advance(0.5)
    agent.sent[1].deferred.errback(ConnectionRefusedError("refused"))
    assert result_of(d) is False


def test_log_channel_reports_success() -> None:
    """LogChannel.send fires True at once so the escalation waits for an operator."""
    assert result_of(LogChannel().send(make_request())) is True
