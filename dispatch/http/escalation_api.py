"""Operator actions, responder callbacks and escalation policies under /api/v1."""

from __future__ import annotations

from typing import Any

from dispatch import logs, metrics
from dispatch.districts import DISTRICTS
from dispatch.http.router import ALL, OPERATORS, ApiError, ApiRequest, Router
from dispatch.routing import policy as pol
from dispatch.routing import signing
from dispatch.store import escalation as repo

log = logs.get(__name__)


class EscalationApi:
    """Handlers that act on incidents through the engine."""

    def __init__(self, engine: Any, db: Any, clock: Any, secret: bytes) -> None:
        self.engine = engine
        self.db = db
        self.clock = clock
        self.secret = secret
        self.care: Any = None  # the care scheduler, for care-call answers

    @staticmethod
    def _actor(req: ApiRequest) -> str:
        return (req.principal or {}).get("name") or "operator"

    async def _act(self, req: ApiRequest, action: str, **kw: Any) -> tuple[int, Any]:
        incident_id = req.id_param()
        result = await self.engine.operator(incident_id, action, self._actor(req), **kw)
        return 200, {"id": incident_id, "status": result["status"], "action": action}

    async def claim(self, req: ApiRequest) -> tuple[int, Any]:
        return await self._act(req, "claim")

    async def acknowledge(self, req: ApiRequest) -> tuple[int, Any]:
        return await self._act(req, "acknowledge")

    async def resolve(self, req: ApiRequest) -> tuple[int, Any]:
        body = req.json()
        outcome = body.get("outcome") if isinstance(body, dict) else None
        if outcome not in repo.OUTCOMES:
            raise ApiError(
                400,
                "validation_failed",
                f"outcome must be one of {repo.OUTCOMES}",
                {"fields": {"outcome": f"must be one of {list(repo.OUTCOMES)}"}},
            )
        return await self._act(req, "resolve", outcome=outcome)

    async def notes(self, req: ApiRequest) -> tuple[int, Any]:
        body = req.json()
        text = body.get("text") if isinstance(body, dict) else None
        if not isinstance(text, str) or not text.strip() or len(text) > 2000:
            raise ApiError(
                400,
                "validation_failed",
                "text must be 1-2000 characters",
                {"fields": {"text": "must be 1-2000 characters"}},
            )
        return await self._act(req, "note", text=text.strip())

    async def relay_confirm(self, req: ApiRequest) -> tuple[int, Any]:
        return await self._act(req, "relay_confirm")

    async def relay_skip(self, req: ApiRequest) -> tuple[int, Any]:
        return await self._act(req, "relay_skip")

    # --- responder callbacks ------------------------------------------------------------

    async def callback(self, req: ApiRequest) -> tuple[int, Any]:
        problem = signing.verify(
            self.secret,
            req.raw_body,
            req.headers.get(signing.TIMESTAMP_HEADER.lower()),
            req.headers.get(signing.SIGNATURE_HEADER.lower()),
            self.clock.seconds(),
        )
        if problem is not None:
            metrics.CALLBACKS.labels(problem).inc()
            log.warning("callback_rejected", reason=problem, attempt=req.params["attempt"])
            raise ApiError(401, "bad_signature", f"callback signature rejected: {problem}")
        body = req.json()
        answer = body.get("answer") if isinstance(body, dict) else None
        attempt = req.params["attempt"]
        if attempt.startswith("care-") and self.care is not None:
            if answer not in ("accept", "decline", "ok", "help"):
                raise ApiError(400, "validation_failed", "answer must be ok or help")
            result = await self.care.callback_answer(attempt[5:], answer)
            metrics.CALLBACKS.labels("ok").inc()
            return 200, {"round_id": result["round_id"], "result": result["result"]}
        if answer not in ("accept", "decline"):
            metrics.CALLBACKS.labels("invalid").inc()
            raise ApiError(400, "validation_failed", "answer must be accept or decline")
        responder = body.get("responder")
        responder = responder[:100] if isinstance(responder, str) else None
        try:
            result = await self.engine.answer(req.params["attempt"], answer, responder)
        except Exception as exc:
            metrics.CALLBACKS.labels(getattr(exc, "code", "error")).inc()
            raise
        metrics.CALLBACKS.labels("ok").inc()
        return 200, {"incident_id": result["incident_id"], "result": result["result"]}

    # --- policies -----------------------------------------------------------------------

    async def list_policies(self, req: ApiRequest) -> tuple[int, Any]:
        active = req.query.get("all") not in ("1", "true")
        return 200, {"items": await self.db.read(repo.list_policies, active)}

    async def get_policy(self, req: ApiRequest) -> tuple[int, Any]:
        return 200, await self.db.read(repo.get_policy, req.id_param())

    async def save_policy(self, req: ApiRequest) -> tuple[int, Any]:
        body = req.json()
        if not isinstance(body, dict):
            raise ApiError(400, "validation_failed", "body must be a JSON object")
        scope = body.get("scope", "global")
        name = body.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 100:
            raise ApiError(400, "validation_failed", "name must be 1-100 characters")
        district, subscriber_id = body.get("district"), body.get("subscriber_id")
        if scope == "district" and district not in DISTRICTS:
            raise ApiError(400, "validation_failed", f"district must be one of {list(DISTRICTS)}")
        if scope == "subscriber" and not isinstance(subscriber_id, int):
            raise ApiError(400, "validation_failed", "subscriber_id is required for that scope")
        if scope not in ("global", "district", "subscriber"):
            raise ApiError(400, "validation_failed", "scope must be global, district or subscriber")
        try:
            pol.parse(body.get("document"))
        except pol.PolicyError as exc:
            raise ApiError(400, "invalid_policy", str(exc)) from None
        saved = await self.db.write(
            repo.save_policy,
            name.strip(),
            scope,
            district if scope == "district" else None,
            subscriber_id if scope == "subscriber" else None,
            body["document"],
            self._actor(req),
            self.engine.now(),
        )
        return 201, saved


def add_routes(router: Router, api: EscalationApi) -> None:
    """Register the escalation endpoints."""
    p = "/api/v1"
    router.add("POST", f"{p}/incidents/{{id}}/claim", api.claim, OPERATORS)
    router.add("POST", f"{p}/incidents/{{id}}/acknowledge", api.acknowledge, OPERATORS)
    router.add("POST", f"{p}/incidents/{{id}}/resolve", api.resolve, OPERATORS)
    router.add("POST", f"{p}/incidents/{{id}}/notes", api.notes, ALL)
    router.add("POST", f"{p}/incidents/{{id}}/relay/confirm", api.relay_confirm, OPERATORS)
    router.add("POST", f"{p}/incidents/{{id}}/relay/skip", api.relay_skip, OPERATORS)
    router.add("POST", f"{p}/callbacks/{{attempt}}", api.callback, None)
    router.add("GET", f"{p}/policies", api.list_policies, ALL)
    router.add("POST", f"{p}/policies", api.save_policy, ("admin",))
    router.add("GET", f"{p}/policies/{{id}}", api.get_policy, ALL)
