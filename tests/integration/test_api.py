"""The HTTP API over loopback on SQLite and PostgreSQL: auth, errors, subscribers, devices."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest_twisted
import treq

from dispatch.store import tokens
from tests.integration.harness import start_server, stop_server, wait

MINIMAL = {
    "name": "陈爷爷",
    "district": "瓯海区",
    "address": "娄桥街道1号",
    "contacts": [{"name": "陈女士", "phone": "13700000000", "relation": "daughter"}],
    "device": {"protocol": "gt06", "ident": "359710045120345"},
}


def _token(server, role: str, district: str | None = None) -> str:
    session = server.app.db.session_sync()
    with session, session.begin():
        return tokens.create_token(session, role, f"t-{role}", district, datetime.now(UTC))


async def _raw(server, method: str, path: str, body: bytes = b"", token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = await wait(treq.request(method, server.base + path, data=body, headers=headers))
    return resp.code, resp.headers.getRawHeaders("content-type"), await wait(resp.content())


@pytest_twisted.ensureDeferred
async def test_health_and_metrics_need_no_token(db_url):
    """/healthz answers 200 and /metrics serves Prometheus text, both without a token."""
    server = await start_server(db_url)
    try:
        code, _, body = await _raw(server, "GET", "/healthz")
        assert code == 200 and json.loads(body)["status"] == "ok"
        code, ctype, body = await _raw(server, "GET", "/metrics")
        assert code == 200 and ctype[0].startswith("text/plain")
        assert b"dispatch_sos_ack_latency_seconds" in body
    finally:
        await stop_server(server)


@pytest_twisted.ensureDeferred
async def test_auth_errors_are_json(db_url):
    """No token → 401, a bad token → 401, a role without the right → 403, all JSON errors."""
    server = await start_server(db_url)
    try:
        code, ctype, body = await _raw(server, "GET", "/api/v1/incidents")
        assert code == 401 and ctype[0].startswith("application/json")
        assert json.loads(body)["error"] == "unauthorized"
        code, _, body = await _raw(server, "GET", "/api/v1/incidents", token="dsp_nope")
        assert code == 401
        operator = _token(server, "operator")
        code, _, body = await _raw(
            server, "POST", "/api/v1/subscribers", json.dumps(MINIMAL).encode(), operator
        )
        assert code == 403 and json.loads(body)["error"] == "forbidden"
    finally:
        await stop_server(server)


@pytest_twisted.ensureDeferred
async def test_bad_requests_get_4xx_json_never_500(db_url):
    """Malformed JSON, wrong fields, unknown paths and methods, huge ids: 4xx with JSON."""
    server = await start_server(db_url)
    try:
        t = server.token
        cases = [
            ("POST", "/api/v1/subscribers", b"{not json", 400, "invalid_json"),
            ("POST", "/api/v1/subscribers", b"[]", 400, "validation_failed"),
            ("POST", "/api/v1/subscribers", b"", 400, "invalid_json"),
            ("GET", "/api/v1/nothing", b"", 404, "not_found"),
            ("PUT", "/api/v1/subscribers", b"", 405, "method_not_allowed"),
            ("GET", "/api/v1/subscribers/abc", b"", 404, "not_found"),
            ("GET", "/api/v1/subscribers/99999999999999999999999", b"", 404, "not_found"),
            ("GET", "/api/v1/incidents/12345", b"", 404, "not_found"),
            ("GET", "/api/v1/incidents?limit=0", b"", 400, "invalid_query"),
            ("GET", "/api/v1/devices/000", b"", 404, "not_found"),
        ]
        for method, path, body, want, err in cases:
            code, ctype, raw = await _raw(server, method, path, body, t)
            assert (code, json.loads(raw)["error"]) == (want, err), (method, path, raw)
            assert ctype[0].startswith("application/json")
    finally:
        await stop_server(server)


@pytest_twisted.ensureDeferred
async def test_subscriber_lifecycle(db_url):
    """Create the smallest body, read it, patch contacts, de-register; each step is visible."""
    server = await start_server(db_url)
    try:
        code, created = await server.post("/api/v1/subscribers", MINIMAL)
        assert code == 201
        sid = created["id"]
        code, sub = await server.get(f"/api/v1/subscribers/{sid}")
        assert sub["contacts"][0]["tier"] == "family"
        assert sub["device"] == MINIMAL["device"]
        code, device = await server.get("/api/v1/devices/359710045120345")
        assert code == 200 and device["online"] is False and device["subscriber_id"] == sid
        patch = {
            "contacts": [
                {
                    "name": "社区张",
                    "phone": "0577-88888888",
                    "relation": "worker",
                    "tier": "community",
                }
            ]
        }
        resp = await wait(
            treq.request(
                "PATCH",
                server.base + f"/api/v1/subscribers/{sid}",
                data=json.dumps(patch).encode(),
                headers={"Authorization": f"Bearer {server.token}"},
            )
        )
        assert resp.code == 200
        sub = json.loads(await wait(resp.content()))
        assert [c["tier"] for c in sub["contacts"]] == ["community"]
        resp = await wait(
            treq.request(
                "DELETE",
                server.base + f"/api/v1/subscribers/{sid}",
                data=json.dumps({"reason": "moved away"}).encode(),
                headers={"Authorization": f"Bearer {server.token}"},
            )
        )
        assert resp.code == 200
        sub = json.loads(await wait(resp.content()))
        assert sub["status"] == "deregistered" and sub["device"] is None
        code, device = await server.get("/api/v1/devices/359710045120345")
        assert device["subscriber_id"] is None
        code, page = await server.get("/api/v1/subscribers?status=deregistered")
        assert page["total"] == 1
    finally:
        await stop_server(server)


@pytest_twisted.ensureDeferred
async def test_validation_reports_every_field(db_url):
    """A body with several mistakes gets one 400 naming each field, and nothing is stored."""
    server = await start_server(db_url)
    try:
        body = dict(
            MINIMAL,
            district="Atlantis",
            contacts=[{"name": "x", "phone": "call me"}],
            device={"protocol": "gt06", "ident": "123"},
        )
        code, err = await server.post("/api/v1/subscribers", body)
        assert code == 400 and err["error"] == "validation_failed"
        assert set(err["fields"]) == {"district", "contacts[0].phone", "device"}
        code, page = await server.get("/api/v1/subscribers")
        assert page["total"] == 0
    finally:
        await stop_server(server)


@pytest_twisted.ensureDeferred
async def test_device_ident_taken_is_conflict(db_url):
    """Binding a terminal already bound to someone else is a 409, not a silent move."""
    server = await start_server(db_url)
    try:
        assert (await server.post("/api/v1/subscribers", MINIMAL))[0] == 201
        code, err = await server.post("/api/v1/subscribers", dict(MINIMAL, name="别人"))
        assert code == 409 and err["error"] == "conflict"
    finally:
        await stop_server(server)


@pytest_twisted.ensureDeferred
async def test_district_token_is_scoped(db_url):
    """A district-scoped token enrolls only in its district and lists only its subscribers."""
    server = await start_server(db_url)
    try:
        await server.post("/api/v1/subscribers", MINIMAL)  # 瓯海区, by the admin
        lucheng = _token(server, "district", "鹿城区")
        code, err = await server.post("/api/v1/subscribers", MINIMAL, token=lucheng)
        assert code == 403
        body = dict(MINIMAL, district="鹿城区", device={"protocol": "native", "ident": "A1"})
        code, _ = await server.post("/api/v1/subscribers", body, token=lucheng)
        assert code == 201
        code, page = await server.get("/api/v1/subscribers", token=lucheng)
        assert [s["district"] for s in page["items"]] == ["鹿城区"]
    finally:
        await stop_server(server)


@pytest_twisted.ensureDeferred
async def test_openapi_document_lists_every_route(db_url):
    """The OpenAPI document is served and describes each public path."""
    server = await start_server(db_url)
    try:
        code, doc = await server.get("/api/v1/openapi.json")
        assert code == 200 and doc["openapi"].startswith("3.")
        for path in (
            "/api/v1/subscribers",
            "/api/v1/subscribers/{id}",
            "/api/v1/incidents",
            "/api/v1/incidents/{id}",
            "/api/v1/devices/{ident}",
            "/healthz",
        ):
            assert path in doc["paths"], path
    finally:
        await stop_server(server)


@pytest_twisted.ensureDeferred
async def test_live_stream_pushes_new_incidents(db_url):
    """The SSE stream needs a token and pushes an event when an SOS opens an incident."""
    from twisted.internet import defer, protocol

    from dispatch import events as ev
    from simulators.native_codec import NativeTerminalCodec
    from tests.integration.harness import RawClient, sleep

    server = await start_server(db_url)
    try:
        code, _, _ = await _raw(server, "GET", "/api/v1/incidents/stream")
        assert code == 401
        await server.subscriber("860000000000002")
        received: list[bytes] = []
        done: defer.Deferred = defer.Deferred()

        class Collect(protocol.Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)

            def connectionLost(self, reason=None) -> None:
                done.callback(None)

        resp = await wait(
            treq.get(
                server.base + "/api/v1/incidents/stream",
                headers={"Authorization": f"Bearer {server.token}"},
            )
        )
        assert resp.code == 200
        assert resp.headers.getRawHeaders("content-type")[0].startswith("text/event-stream")
        resp.deliverBody(Collect())
        codec = NativeTerminalCodec("860000000000002")
        client = RawClient(server.ports["native"])
        client.send(codec.login())
        client.send(codec.sos(ev.SosTrigger.FALL, None, 1_800_000_000, 50)[0])
        for _ in range(50):
            if b"event: incident" in b"".join(received):
                break
            await sleep(0.1)
        client.close()
        text = b"".join(received).decode()
        data = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
        assert {"id": 1, "what": "new", "type": "incident", "trigger": "fall"} in data
    finally:
        await stop_server(server)


@pytest_twisted.ensureDeferred
async def test_console_login_cookie_and_csrf_guard(db_url):
    """The console page loads; login sets an HttpOnly cookie that authenticates API reads;
    a cookie-only write without the console header is refused."""
    server = await start_server(db_url)
    try:
        code, ctype, body = await _raw(server, "GET", "/console")
        assert code == 200 and ctype[0].startswith("text/html") and b"live queue" in body
        resp = await wait(
            treq.post(
                server.base + "/console/login", data=json.dumps({"token": "dsp_wrong"}).encode()
            )
        )
        assert resp.code == 401
        resp = await wait(
            treq.post(
                server.base + "/console/login", data=json.dumps({"token": server.token}).encode()
            )
        )
        assert resp.code == 200, await wait(resp.content())
        [cookie] = resp.headers.getRawHeaders("set-cookie")
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        jar = {"dispatch_token": server.token}
        resp = await wait(treq.get(server.base + "/api/v1/incidents", cookies=jar))
        assert resp.code == 200
        resp = await wait(treq.post(server.base + "/api/v1/incidents/1/acknowledge", cookies=jar))
        assert resp.code == 403
        resp = await wait(
            treq.post(
                server.base + "/api/v1/incidents/1/acknowledge",
                cookies=jar,
                headers={"X-Dispatch-Console": "1"},
            )
        )
        assert resp.code == 404  # authenticated; there is simply no incident 1
    finally:
        await stop_server(server)
