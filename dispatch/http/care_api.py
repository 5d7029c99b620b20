"""Care plans, care history and the care report under /api/v1."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from typing import Any

from dispatch.districts import DISTRICTS
from dispatch.http.router import ALL, ENROLL, ApiError, ApiRequest, Router
from dispatch.routing import care_schedule as cs
from dispatch.routing.care import plan_for
from dispatch.store import care as repo

MAX_REPORT_DAYS = 366


class CareApi:
    """Handlers bound to the store and the care scheduler."""

    def __init__(self, db: Any, scheduler: Any) -> None:
        self.db = db
        self.scheduler = scheduler

    @staticmethod
    def _validate(body: Any, base: cs.CarePlan | None = None) -> dict[str, Any]:
        try:
            cs.parse_plan(body, base)
        except cs.CarePlanError as exc:
            raise ApiError(400, "invalid_care_plan", str(exc)) from None
        return body

    async def get_plan(self, req: ApiRequest) -> tuple[int, Any]:
        inputs = await self.db.read(repo.plan_inputs, req.id_param())
        return 200, {
            "effective": plan_for(inputs).to_json(),
            "district_document": inputs["district_doc"],
            "subscriber_document": inputs["subscriber_doc"],
            "default": "daily" if inputs["living_situation"] == "alone" else "weekly",
        }

    async def put_plan(self, req: ApiRequest) -> tuple[int, Any]:
        sid = req.id_param()
        inputs = await self.db.read(repo.plan_inputs, sid)
        # Checked on top of what it overrides: the district's plan, not the bare default.
        body = self._validate(req.json(), plan_for({**inputs, "subscriber_doc": None}))
        actor = (req.principal or {}).get("name", "api")
        await self.db.write(repo.save_plan, "subscriber", sid, body, actor, self.scheduler.now())
        await self.scheduler.replan(sid)
        return await self.get_plan(req)

    async def put_district_plan(self, req: ApiRequest) -> tuple[int, Any]:
        district = req.params["district"]
        if district not in DISTRICTS:
            raise ApiError(404, "not_found", f"no district {district!r}")
        own = (req.principal or {}).get("district")
        if req.principal and req.principal["role"] == "district" and own and own != district:
            raise ApiError(403, "forbidden", f"this token is for district {own}")
        body = self._validate(req.json())
        await self.db.write(
            repo.save_plan,
            "district",
            district,
            body,
            (req.principal or {}).get("name", "api"),
            self.scheduler.now(),
        )
        return 200, {"district": district, "document": body}

    async def check_now(self, req: ApiRequest) -> tuple[int, Any]:
        round_id = await self.scheduler.check_now(req.id_param())
        return 202, {"round_id": round_id}

    async def history(self, req: ApiRequest) -> tuple[int, Any]:
        limit = req.int_query("limit", 100, 1, 1000)
        return 200, {"items": await self.db.read(repo.history, req.id_param(), limit)}

    async def report(self, req: ApiRequest) -> tuple[int, Any]:
        try:
            start = date.fromisoformat(req.query["from"])
            end = date.fromisoformat(req.query["to"])
        except KeyError:
            raise ApiError(400, "invalid_query", "from and to are required (YYYY-MM-DD)") from None
        except ValueError:
            raise ApiError(400, "invalid_query", "from and to must be YYYY-MM-DD") from None
        if end < start or (end - start).days > MAX_REPORT_DAYS:
            raise ApiError(
                400, "invalid_query", f"to must be after from, at most {MAX_REPORT_DAYS} days later"
            )
        district = req.query.get("district")
        if district is not None and district not in DISTRICTS:
            raise ApiError(400, "invalid_query", f"district must be one of {list(DISTRICTS)}")
        own = (req.principal or {}).get("district")
        if req.principal and req.principal["role"] == "district" and own:
            district = own
        tz = cs.CarePlan().tz
        lo = datetime.combine(start, time(0), tz)
        hi = datetime.combine(end + timedelta(days=1), time(0), tz)
        rows = await self.db.read(repo.report, district, lo, hi)
        return 200, {
            "from": start.isoformat(),
            "to": end.isoformat(),
            "district": district,
            "days": rows,
        }


def add_routes(router: Router, api: CareApi) -> None:
    """Register the care endpoints."""
    p = "/api/v1"
    router.add("GET", f"{p}/subscribers/{{id}}/care-plan", api.get_plan, ALL)
    router.add("PUT", f"{p}/subscribers/{{id}}/care-plan", api.put_plan, ENROLL)
    router.add("PUT", f"{p}/care-plans/districts/{{district}}", api.put_district_plan, ENROLL)
    router.add("GET", f"{p}/subscribers/{{id}}/care", api.history, ALL)
    router.add(
        "POST",
        f"{p}/subscribers/{{id}}/care/check",
        api.check_now,
        ("admin", "operator", "district"),
    )
    router.add("GET", f"{p}/reports/care", api.report, ALL)
