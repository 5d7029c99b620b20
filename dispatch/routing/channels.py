"""Notification channels: how a call, an SMS or a 110/120 relay leaves the server.

One interface, :class:`Channel`; the engine never knows which one it has.  The
webhook channel hands each request to an HTTP endpoint (an SMS/voice provider,
a 110/120 integration); answers come back later through the signed callback
URL in the request.  A SIP/voice channel would implement the same ``send``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from io import BytesIO
from typing import Any, Protocol

from twisted.internet import defer, task
from twisted.internet import protocol as tproto
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers

from dispatch import logs
from dispatch.routing import signing

log = logs.get(__name__)


@dataclass(frozen=True)
class CallRequest:
    """One notification to one person or desk (the JSON body of a webhook post)."""

    type: str  # call, sms, relay
    attempt_id: str
    incident_id: int
    incident_kind: str
    tier: str
    channel: str
    phone: str
    name: str
    relation: str | None
    subscriber: dict[str, Any] | None
    message: str
    callback_url: str
    expires_at: str

    def body(self) -> bytes:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":")).encode()


class Channel(Protocol):
    """Something that can deliver a :class:`CallRequest`."""

    name: str

    def send(self, request: CallRequest) -> defer.Deferred[bool]:
        """Fire with True once the request was handed over, False if it could not be."""
        ...


class LogChannel:
    """For when no provider is configured: log the request; operators see it in the queue."""

    name = "log"

    def send(self, request: CallRequest) -> defer.Deferred[bool]:
        log.warning(
            "notification_not_sent",
            tier=request.tier,
            channel=request.channel,
            incident=request.incident_id,
            phone=request.phone,
            reason="no --webhook-url configured",
        )
        return defer.succeed(True)


class _Drain(tproto.Protocol):
    """Read and discard a response body (the answer comes later, by callback)."""

    def __init__(self, done: defer.Deferred[None]) -> None:
        self.done = done

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(None)


class WebhookChannel:
    """POST signed JSON to a URL; retry with backoff; time out a hanging endpoint."""

    name = "webhook"

    def __init__(
        self,
        reactor: Any,
        url: str,
        secret: bytes,
        *,
        timeout_s: float = 5.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        agent: Any = None,
    ) -> None:
        self.reactor = reactor
        self.url = url.encode()
        self.secret = secret
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.agent = agent or Agent(reactor, connectTimeout=timeout_s)

    def send(self, request: CallRequest) -> defer.Deferred[bool]:
        return defer.ensureDeferred(self._send(request))

    async def _send(self, request: CallRequest) -> bool:
        body = request.body()
        for attempt in range(1, self.retries + 1):
            error = await self._post(body)
            if error is None:
                return True
            log.warning(
                "webhook_failed",
                attempt=attempt,
                error=error,
                incident=request.incident_id,
                tier=request.tier,
            )
            if attempt < self.retries:
                delay = self.backoff_s * 2 ** (attempt - 1)
                await task.deferLater(self.reactor, delay, lambda: None)
        return False

    async def _post(self, body: bytes) -> str | None:
        headers = Headers({b"content-type": [b"application/json"]})
        for key, value in signing.sign(self.secret, body, int(self.reactor.seconds())).items():
            headers.addRawHeader(key.encode(), value.encode())
        try:
            d = self.agent.request(b"POST", self.url, headers, FileBodyProducer(BytesIO(body)))
            d.addTimeout(self.timeout_s, self.reactor)
            response = await d
            done: defer.Deferred[None] = defer.Deferred()
            response.deliverBody(_Drain(done))
            done.addTimeout(self.timeout_s, self.reactor)
            await done
        except Exception as exc:  # timeouts, refused connections, resets: all "failed"
            return f"{type(exc).__name__}: {exc}"[:200]
        if 200 <= response.code < 300:
            return None
        return f"HTTP {response.code}"
