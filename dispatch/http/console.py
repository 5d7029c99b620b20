"""The operator console: one static page, and a login that sets its session cookie.

The page talks to the same JSON API with the cookie instead of a bearer header;
the cookie is HttpOnly and SameSite=Strict, and the router also demands an
``X-Dispatch-Console`` header on cookie-authenticated writes, so another site
cannot make an operator's browser act on an incident.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.web import server
from twisted.web.resource import Resource

from dispatch import logs

log = logs.get(__name__)

PAGE = Path(__file__).with_name("console.html")
COOKIE = b"dispatch_token"


class ConsolePage(Resource):
    """The static console page (read once)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.body = PAGE.read_bytes()

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"x-frame-options", b"DENY")
        return self.body


def console_page() -> Resource:
    """The static console page."""
    return ConsolePage()


class ConsoleLogin(Resource):
    """POST {"token": …}: check it, then keep it in a session cookie."""

    isLeaf = True

    def __init__(self, authenticate: Any) -> None:
        super().__init__()
        self.authenticate = authenticate

    def render_POST(self, request: server.Request) -> Any:
        d = defer.ensureDeferred(self._login(request))
        d.addErrback(self._failed, request)
        return server.NOT_DONE_YET

    async def _login(self, request: server.Request) -> None:
        try:
            token = json.loads(request.content.read(4096) or b"{}").get("token", "")
        except (ValueError, AttributeError):
            token = ""
        principal = await self.authenticate(token) if isinstance(token, str) and token else None
        if principal is None:
            self._reply(
                request, 401, {"error": "unauthorized", "detail": "token is unknown or revoked"}
            )
            return
        request.addCookie(
            COOKIE,
            token.encode(),
            path=b"/",
            httpOnly=True,
            sameSite="strict",
            max_age=str(12 * 3600),
        )
        self._reply(request, 200, {"role": principal["role"], "name": principal["name"]})

    def _failed(self, failure: Any, request: server.Request) -> None:
        log.error("console_login_failed", error=failure.getErrorMessage())
        self._reply(request, 400, {"error": "bad_request", "detail": "could not sign in"})

    @staticmethod
    def _reply(request: server.Request, status: int, body: dict[str, Any]) -> None:
        if request.finished or request._disconnected:
            return
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        request.write(json.dumps(body).encode())
        request.finish()
