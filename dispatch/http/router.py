"""A small JSON router on twisted.web: routes, auth, errors.

Handlers are ``async def handler(req: ApiRequest) -> tuple[int, Any]``.  Any
:class:`ApiError` becomes ``{"error", "detail"}`` with its status; anything
unexpected is logged and answered with a 500 that reveals nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.web import server
from twisted.web.resource import Resource

from dispatch import logs
from dispatch.store.errors import Conflict, NotFound

log = logs.get(__name__)

MAX_BODY = 1 << 20

# Who may call what; every route names one of these (or None: no token).
ALL = ("admin", "operator", "district", "community")
OPERATORS = ("admin", "operator")
ENROLL = ("admin", "district")


class ApiError(Exception):
    """An error for the client: HTTP status, a stable code and a sentence."""

    def __init__(
        self, status: int, code: str, detail: str, extra: dict[str, Any] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.extra = extra or {}


@dataclass
class ApiRequest:
    """What a handler sees of a request."""

    method: str
    path: str
    params: dict[str, str]
    query: dict[str, str]
    raw_body: bytes
    principal: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        """The body parsed as JSON, or a 400."""
        if not self.raw_body:
            raise ApiError(400, "invalid_json", "request body is empty; JSON expected")
        try:
            return json.loads(self.raw_body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None

    def id_param(self, name: str = "id") -> int:
        """A positive integer id from the path; anything else is a 404 (no such object)."""
        try:
            value = int(self.params[name])
        except ValueError:
            raise ApiError(404, "not_found", f"{name} must be an integer id") from None
        if not 0 < value < 2**63:
            raise ApiError(404, "not_found", f"{name} {value} does not exist")
        return value

    def int_query(self, name: str, default: int, lo: int, hi: int) -> int:
        """An integer query parameter within [lo, hi], or a 400."""
        raw = self.query.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ApiError(400, "invalid_query", f"{name} must be an integer") from None
        if not lo <= value <= hi:
            raise ApiError(400, "invalid_query", f"{name} must be between {lo} and {hi}")
        return value


Handler = Callable[[ApiRequest], Awaitable[tuple[int, Any]]]


async def _no_handler(req: ApiRequest) -> tuple[int, Any]:
    raise ApiError(404, "not_found", "no handler")


Authenticator = Callable[[str], Awaitable[dict[str, Any] | None]]


@dataclass
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    roles: tuple[str, ...] | None  # None: no authentication


class Router(Resource):
    """The API's single resource; dispatches on method and path."""

    isLeaf = True

    def __init__(self, authenticate: Authenticator) -> None:
        super().__init__()
        self.routes: list[Route] = []
        self.raw: dict[str, Resource] = {}
        self.streams: dict[str, tuple[Callable[[server.Request], None], tuple[str, ...]]] = {}
        self.authenticate = authenticate

    def add(self, method: str, path: str, handler: Handler, roles: tuple[str, ...] | None) -> None:
        """Register ``handler``; ``{name}`` in ``path`` captures one segment."""
        regex = "^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$"
        self.routes.append(Route(method, re.compile(regex), handler, roles))

    def render(self, request: server.Request) -> Any:
        path = request.path.decode("utf-8", "replace")
        if path in self.raw:
            return self.raw[path].render(request)
        if path in self.streams and request.method == b"GET":
            d = defer.ensureDeferred(self._open_stream(request, path))
            d.addCallback(lambda err: err and self._write(request, *err))
            return server.NOT_DONE_YET
        d = defer.ensureDeferred(self._dispatch(request, path))
        d.addCallback(lambda result: self._write(request, *result))
        return server.NOT_DONE_YET

    async def _dispatch(self, request: server.Request, path: str) -> tuple[int, Any]:
        method = request.method.decode()
        try:
            route, params = self._match(method, path)
            principal = await self._auth(request, route)
            body = request.content.read(MAX_BODY + 1) if request.content else b""
            if len(body) > MAX_BODY:
                raise ApiError(413, "body_too_large", f"request bodies are limited to {MAX_BODY}")
            query = {k.decode(): v[-1].decode("utf-8", "replace") for k, v in request.args.items()}
            headers = {
                k.decode().lower(): v[-1].decode("latin-1")
                for k, v in request.requestHeaders.getAllRawHeaders()
            }
            req = ApiRequest(method, path, params, query, body, principal, headers)
            return await route.handler(req)
        except ApiError as err:
            return err.status, {"error": err.code, "detail": err.detail, **err.extra}
        except NotFound as err:
            return 404, {"error": "not_found", "detail": str(err)}
        except Conflict as err:
            return 409, {"error": "conflict", "detail": str(err)}
        except Exception:
            log.exception("api_handler_failed", method=method, path=path)
            return 500, {"error": "internal", "detail": "the server could not complete this"}

    async def _open_stream(self, request: server.Request, path: str) -> tuple | None:
        opener, roles = self.streams[path]
        route = Route("GET", re.compile(""), _no_handler, roles)
        try:
            await self._auth(request, route)
        except ApiError as err:
            return err.status, {"error": err.code, "detail": err.detail}
        opener(request)
        return None

    def _match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        allowed = []
        for route in self.routes:
            m = route.pattern.match(path)
            if m:
                if route.method == method:
                    return route, m.groupdict()
                allowed.append(route.method)
        if allowed:
            raise ApiError(405, "method_not_allowed", f"{method} not allowed; use {allowed}")
        raise ApiError(404, "not_found", f"no such endpoint: {path}")

    async def _auth(self, request: server.Request, route: Route) -> dict[str, Any] | None:
        if route.roles is None:
            return None
        header = (request.getHeader("authorization") or "").strip()
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not token:
            token = (request.getCookie(b"dispatch_token") or b"").decode("ascii", "replace")
            # A cookie rides along on cross-site requests; a custom header cannot.
            if token and request.method != b"GET" and not request.getHeader("x-dispatch-console"):
                raise ApiError(403, "forbidden", "console writes need X-Dispatch-Console")
        if not token:
            raise ApiError(401, "unauthorized", "send Authorization: Bearer <token>")
        principal = await self.authenticate(token)
        if principal is None:
            raise ApiError(401, "unauthorized", "token is unknown or revoked")
        if principal["role"] not in route.roles:
            raise ApiError(
                403, "forbidden", f"role {principal['role']} may not do this; needs {route.roles}"
            )
        return principal

    def _write(self, request: server.Request, status: int, body: Any) -> None:
        if request._disconnected:
            return
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.write(json.dumps(body, ensure_ascii=False).encode())
        request.finish()
