"""The /api/v1 endpoints: subscribers, devices, incidents, the OpenAPI document."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from prometheus_client.twisted import MetricsResource

from dispatch.http import validate
from dispatch.http.console import ConsoleLogin, console_page
from dispatch.http.openapi import openapi_document
from dispatch.http.router import ALL, ENROLL, ApiError, ApiRequest, Router
from dispatch.store import devices as device_repo
from dispatch.store import incidents as incident_repo
from dispatch.store import subscribers as subscriber_repo
from dispatch.store import tokens as token_repo

PREFIX = "/api/v1"
TOKEN_CACHE_S = 30.0


class Api:
    """Handlers bound to the store and clock."""

    def __init__(self, db: Any, clock: Any, live: Any = None) -> None:
        """``live``: the gateway's LiveState, whose fields are fresher than the store's."""
        self.db = db
        self.clock = clock
        self.live = live
        self._tokens: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self.ready = False

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), UTC)

    async def authenticate(self, token: str) -> dict[str, Any] | None:
        """Resolve a bearer token, caching answers briefly to spare the database."""
        hit = self._tokens.get(token)
        mono = time.monotonic()
        if hit and hit[0] > mono:
            return hit[1]
        principal = await self.db.read(token_repo.lookup_token, token)
        if len(self._tokens) > 10_000:
            self._tokens.clear()
        self._tokens[token] = (mono + TOKEN_CACHE_S, principal)
        return principal

    # --- helpers --------------------------------------------------------------------

    @staticmethod
    def _check_district(req: ApiRequest, district: str | None) -> None:
        own = (req.principal or {}).get("district")
        if req.principal and req.principal["role"] == "district" and own and district != own:
            raise ApiError(403, "forbidden", f"this token is for district {own}")

    # --- subscribers ----------------------------------------------------------------

    async def create_subscriber(self, req: ApiRequest) -> tuple[int, Any]:
        body = validate.subscriber(req.json())
        self._check_district(req, body["district"])
        new_id = await self.db.write(subscriber_repo.create_subscriber, body, self.now())
        return 201, {"id": new_id, **await self.db.read(subscriber_repo.get_subscriber, new_id)}

    async def list_subscribers(self, req: ApiRequest) -> tuple[int, Any]:
        limit = req.int_query("limit", 100, 1, 1000)
        offset = req.int_query("offset", 0, 0, 10**9)
        district = req.query.get("district")
        own = (req.principal or {}).get("district")
        if req.principal and req.principal["role"] == "district" and own:
            district = own
        items, total = await self.db.read(
            subscriber_repo.list_subscribers, district, req.query.get("status"), limit, offset
        )
        return 200, {"items": items, "total": total, "limit": limit, "offset": offset}

    async def get_subscriber(self, req: ApiRequest) -> tuple[int, Any]:
        sub = await self.db.read(subscriber_repo.get_subscriber, req.id_param())
        self._check_district(req, sub["district"])
        return 200, sub

    async def patch_subscriber(self, req: ApiRequest) -> tuple[int, Any]:
        sub_id = req.id_param()
        changes = validate.subscriber(req.json(), partial=True)
        current = await self.db.read(subscriber_repo.get_subscriber, sub_id)
        self._check_district(req, current["district"])
        if "district" in changes:
            self._check_district(req, changes["district"])
        return 200, await self.db.write(
            subscriber_repo.update_subscriber, sub_id, changes, self.now()
        )

    async def deregister_subscriber(self, req: ApiRequest) -> tuple[int, Any]:
        sub_id = req.id_param()
        body = req.json() if req.raw_body else {}
        reason = body.get("reason") if isinstance(body, dict) else None
        if not isinstance(reason, str) or not reason.strip():
            raise ApiError(
                400,
                "validation_failed",
                "reason is required (moved, deceased, ...)",
                {"fields": {"reason": "is required"}},
            )
        current = await self.db.read(subscriber_repo.get_subscriber, sub_id)
        self._check_district(req, current["district"])
        return 200, await self.db.write(
            subscriber_repo.deregister_subscriber, sub_id, reason.strip()[:200], self.now()
        )

    # --- devices and incidents ------------------------------------------------------

    async def get_device(self, req: ApiRequest) -> tuple[int, Any]:
        ident = req.params["ident"]
        device = await self.db.read(device_repo.get_device, ident)
        # The store gets last_seen only every few minutes while a device is online.
        current = self.live.get(ident) if self.live is not None else None
        if current is not None:
            device.update(current.view())
        return 200, device

    async def list_incidents(self, req: ApiRequest) -> tuple[int, Any]:
        status = req.query.get("status")
        if status is not None and status not in incident_repo.STATUSES:
            raise ApiError(400, "invalid_query", f"status must be one of {incident_repo.STATUSES}")
        limit = req.int_query("limit", 100, 1, 1000)
        offset = req.int_query("offset", 0, 0, 10**9)
        items = await self.db.read(incident_repo.list_incidents, status, None, limit, offset)
        return 200, {"items": items, "limit": limit, "offset": offset}

    async def get_incident(self, req: ApiRequest) -> tuple[int, Any]:
        return 200, await self.db.read(incident_repo.get_incident, req.id_param())

    async def openapi(self, req: ApiRequest) -> tuple[int, Any]:
        return 200, openapi_document()

    async def healthz(self, req: ApiRequest) -> tuple[int, Any]:
        # 503 until every service has started, so a load balancer or a test that sees
        # 200 knows the engine and the care scheduler are running too.
        if not self.ready:
            return 503, {"status": "starting"}
        return 200, {"status": "ok"}


def build_site_root(api: Api, *extra: Any) -> Router:
    """The whole HTTP face: one router with the API, health and metrics.

    ``extra`` are ``(add_routes, handlers)`` pairs for other parts of the API.
    """
    router = Router(api.authenticate)
    for add_routes, handlers in extra:
        add_routes(router, handlers)
    router.raw["/metrics"] = MetricsResource()
    router.raw["/console"] = console_page()
    router.raw["/"] = console_page()
    router.raw["/console/login"] = ConsoleLogin(api.authenticate)
    router.add("GET", "/healthz", api.healthz, None)
    p = PREFIX
    router.add("GET", f"{p}/openapi.json", api.openapi, ALL)
    router.add("POST", f"{p}/subscribers", api.create_subscriber, ENROLL)
    router.add("GET", f"{p}/subscribers", api.list_subscribers, ALL)
    router.add("GET", f"{p}/subscribers/{{id}}", api.get_subscriber, ALL)
    router.add("PATCH", f"{p}/subscribers/{{id}}", api.patch_subscriber, ENROLL)
    router.add("DELETE", f"{p}/subscribers/{{id}}", api.deregister_subscriber, ENROLL)
    router.add("GET", f"{p}/devices/{{ident}}", api.get_device, ALL)
    router.add("GET", f"{p}/incidents", api.list_incidents, ALL)
    router.add("GET", f"{p}/incidents/{{id}}", api.get_incident, ALL)
    return router
