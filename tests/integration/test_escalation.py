"""Escalation end to end: terminal simulator → server → webhook → responder simulator → callback.

The five scenarios of the escalation issue, on SQLite and PostgreSQL.  Policies use
waits of a few seconds so each scenario runs in well under a minute.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime

import pytest_twisted
import treq

from dispatch import events as ev
from dispatch.store import db as dbmod
from dispatch.store import tokens
from simulators.native_codec import NativeTerminalCodec
from tests.integration.harness import (
    SECRET,
    LineCollector,
    RawClient,
    free_port,
    run_terminal,
    sleep,
    start_responders,
    start_server,
    stop_server,
    wait,
)

IDENT = "860000000000009"
FAMILY1, FAMILY2 = "13900000001", "13900000002"


def policy(wait_s: float = 2, relay_deadline_s: int = 300, relay_wait: int = 20) -> dict:
    """A fast alarm policy: each family contact, then community, then 120, then operators."""
    return {
        "name": "alarm",
        "scope": "global",
        "document": {
            "kinds": ["sos", "fall"],
            "relay_deadline_s": relay_deadline_s,
            "steps": [
                {"tier": "family", "targets": "in_order", "channels": ["voice"], "wait_s": wait_s},
                {
                    "tier": "community",
                    "targets": "in_order",
                    "channels": ["voice"],
                    "wait_s": wait_s,
                },
                {"tier": "relay_120", "wait_s": relay_wait},
                {"tier": "operator", "wait_s": 0},
            ],
        },
    }


CONTACTS = [
    {"name": "大儿子", "phone": "13900000001", "relation": "son"},
    {"name": "小女儿", "phone": "13900000002", "relation": "daughter"},
    {"name": "网格员", "phone": "13900000003", "relation": "worker", "tier": "community"},
]


async def _setup(db_url: str, tmp_path, script: dict, **pol) -> tuple:
    responders, port = await start_responders(tmp_path, script)
    server = await start_server(
        db_url,
        webhook_url=f"http://127.0.0.1:{port}/hook",
        webhook_secret=SECRET,
    )
    code, saved = await server.post("/api/v1/policies", policy(**pol))
    assert code == 201, saved
    await server.subscriber(IDENT, contacts=CONTACTS)
    return server, responders


async def _sos(server) -> int:
    code, lines = await run_terminal(
        "--server",
        f"127.0.0.1:{server.ports['native']}",
        "--ident",
        IDENT,
        "--sos-after",
        "0.2",
    )
    assert code == 0, lines
    code, queue = await server.get("/api/v1/incidents")
    return queue["items"][0]["id"]


async def _incident(server, incident_id: int) -> dict:
    code, incident = await server.get(f"/api/v1/incidents/{incident_id}")
    assert code == 200
    return incident


async def _until(server, incident_id: int, predicate, seconds: float = 20) -> dict:
    deadline = datetime.now(UTC).timestamp() + seconds
    while True:
        incident = await _incident(server, incident_id)
        if predicate(incident):
            return incident
        if datetime.now(UTC).timestamp() > deadline:
            raise AssertionError(json.dumps(incident, ensure_ascii=False, indent=1))
        await sleep(0.1)


def _calls(responders: LineCollector) -> list[str]:
    return [line["phone"] for line in responders.lines if "phone" in line]


def _notified(incident: dict) -> list[tuple[str, str]]:
    return [
        (t["tier"], t["target"].split()[-1])
        for t in incident["timeline"]
        if t["action"] in ("notify", "relay")
    ]


@pytest_twisted.ensureDeferred
async def test_a_second_family_member_accepts(db_url, tmp_path):
    """First contact never answers, the second accepts: acknowledged at the family tier."""
    server, responders = await _setup(
        db_url,
        tmp_path,
        {
            FAMILY1: {"answer": "never"},
            FAMILY2: {"answer": "accept", "after": 0.5},
            "*": {"answer": "never"},
        },
    )
    try:
        incident_id = await _sos(server)
        incident = await _until(server, incident_id, lambda i: i["status"] == "acknowledged")
        assert _notified(incident) == [("family", FAMILY1), ("family", FAMILY2)]
        answers = [t for t in incident["timeline"] if t["action"] == "answer"]
        assert [(a["tier"], a["outcome"]) for a in answers] == [("family", "accepted")]
        assert _calls(responders) == [FAMILY1, FAMILY2]
        assert incident["policy_version"] >= 2  # ran under the saved (newer) policy
    finally:
        await stop_server(server)
        await responders.stop()


@pytest_twisted.ensureDeferred
async def test_b_relay_after_operator_confirmation(db_url, tmp_path):
    """Nobody answers → community → 120 relay waits for the operator, who confirms."""
    server, responders = await _setup(
        db_url,
        tmp_path,
        {
            "120": {"answer": "accept", "after": 0.3},
            "*": {"answer": "never"},
        },
        wait_s=1,
        relay_deadline_s=600,
    )
    try:
        incident_id = await _sos(server)
        await _until(
            server,
            incident_id,
            lambda i: any(t["action"] == "relay_pending" for t in i["timeline"]),
        )
        await sleep(1.0)
        assert "120" not in _calls(responders)  # relay waits for a human decision
        code, body = await server.post(f"/api/v1/incidents/{incident_id}/relay/confirm", {})
        assert code == 200, body
        incident = await _until(server, incident_id, lambda i: i["status"] == "acknowledged")
        assert _notified(incident)[-1] == ("relay_120", "120")
        [relay_call] = [line for line in responders.lines if line.get("phone") == "120"]
        assert relay_call["tier"] == "relay_120" and relay_call["type"] == "relay"
        actions = [t["action"] for t in incident["timeline"]]
        assert actions.index("relay_pending") < actions.index("relay_confirm")
    finally:
        await stop_server(server)
        await responders.stop()


@pytest_twisted.ensureDeferred
async def test_b_relay_after_deadline_without_operator(db_url, tmp_path):
    """With no operator decision the relay goes to 120 when the deadline passes."""
    server, responders = await _setup(
        db_url,
        tmp_path,
        {
            "120": {"answer": "accept", "after": 0.3},
            "*": {"answer": "never"},
        },
        wait_s=1,
        relay_deadline_s=5,
    )
    try:
        incident_id = await _sos(server)
        incident = await _until(server, incident_id, lambda i: i["status"] == "acknowledged")
        actions = [t["action"] for t in incident["timeline"]]
        assert "relay_deadline_passed" in actions and "relay_confirm" not in actions
        assert [tier for tier, _ in _notified(incident)] == [
            "family",
            "family",
            "community",
            "relay_120",
        ]
    finally:
        await stop_server(server)
        await responders.stop()


@pytest_twisted.ensureDeferred
async def test_d_resent_sos_starts_one_escalation(db_url, tmp_path):
    """The same SOS frame three times: one incident, one escalation, one call per step."""
    server, responders = await _setup(db_url, tmp_path, {"*": {"answer": "never"}}, wait_s=30)
    try:
        codec = NativeTerminalCodec(IDENT)
        sos, _ = codec.sos(ev.SosTrigger.BUTTON, None, 1_800_000_000, 80)
        client = RawClient(server.ports["native"])
        client.send(codec.login())
        for _ in range(3):
            client.send(sos)
            await client.recv(0.3)
        client.close()
        await responders.wait_for(lambda line: line.get("phone") == FAMILY1)
        await sleep(1.0)
        code, queue = await server.get("/api/v1/incidents")
        [item] = queue["items"]
        incident = await _incident(server, item["id"])
        actions = [t["action"] for t in incident["timeline"]]
        assert actions.count("escalation_started") == 1 and actions.count("alarm") == 1
        assert _calls(responders) == [FAMILY1]
    finally:
        await stop_server(server)
        await responders.stop()


@pytest_twisted.ensureDeferred
async def test_e_operator_acknowledge_stops_escalation(db_url, tmp_path):
    """An operator's acknowledge stops the calls; a second resolve is a 409."""
    server, responders = await _setup(db_url, tmp_path, {"*": {"answer": "never"}}, wait_s=2)
    try:
        incident_id = await _sos(server)
        await responders.wait_for(lambda line: line.get("phone") == FAMILY1)
        code, body = await server.post(f"/api/v1/incidents/{incident_id}/acknowledge", {})
        assert code == 200 and body["status"] == "acknowledged"
        await sleep(3.0)
        assert _calls(responders) == [FAMILY1]
        code, _ = await server.post(
            f"/api/v1/incidents/{incident_id}/resolve", {"outcome": "false_alarm"}
        )
        assert code == 200
        code, err = await server.post(
            f"/api/v1/incidents/{incident_id}/resolve", {"outcome": "ambulance"}
        )
        assert code == 409 and err["error"] == "conflict"
        incident = await _incident(server, incident_id)
        assert incident["status"] == "resolved" and incident["outcome"] == "false_alarm"
        ops = [
            (t["action"], t["actor"])
            for t in incident["timeline"]
            if t["tier"] == "operator" and t["action"] in ("acknowledge", "resolve")
        ]
        assert ops == [("acknowledge", "test-admin"), ("resolve", "test-admin")]
    finally:
        await stop_server(server)
        await responders.stop()


@pytest_twisted.ensureDeferred
async def test_bad_callbacks_change_nothing(db_url, tmp_path):
    """A callback with a bad signature is 401; one for a closed incident is 409."""
    server, responders = await _setup(db_url, tmp_path, {"*": {"answer": "never"}}, wait_s=30)
    try:
        incident_id = await _sos(server)
        [call] = await responders.wait_for(lambda line: line.get("phone") == FAMILY1)
        url = f"{server.base}/api/v1/callbacks/{call['attempt']}"
        body = json.dumps({"answer": "accept"}).encode()
        resp = await wait(
            treq.post(
                url,
                data=body,
                headers={"X-Dispatch-Timestamp": "1", "X-Dispatch-Signature": "sha256=00"},
            )
        )
        assert resp.code == 401
        assert (await _incident(server, incident_id))["status"] == "open"
        await server.post(f"/api/v1/incidents/{incident_id}/resolve", {"outcome": "other"})
        from dispatch.routing import signing

        headers = signing.sign(SECRET.encode(), body, int(datetime.now(UTC).timestamp()))
        resp = await wait(treq.post(url, data=body, headers=headers))
        assert resp.code == 409
        assert (await _incident(server, incident_id))["status"] == "resolved"
    finally:
        await stop_server(server)
        await responders.stop()


BURST_DISTRICT = "瓯海区"


async def _reply(client: RawClient, seconds: float = 10.0) -> bytes:
    """The first bytes the server sends back (an ACK), without waiting out a window."""
    deadline = datetime.now(UTC).timestamp() + seconds
    while datetime.now(UTC).timestamp() < deadline:
        data = await client.recv(0.02)
        if data:
            return data
    return b""


@pytest_twisted.ensureDeferred
async def test_f_burst_of_alarms_each_planned_once_under_its_own_policy(db_url, tmp_path):
    """Twelve terminals press at once: planned together, each once, each under its policy."""
    server, responders = await _setup(db_url, tmp_path, {"*": {"answer": "never"}}, wait_s=30)
    clients: list[RawClient] = []
    try:
        community_first = {
            "kinds": ["sos"],
            "steps": [{"tier": "community", "channels": ["voice"], "wait_s": 30}],
        }
        code, district = await server.post(
            "/api/v1/policies",
            {
                "name": "ouhai",
                "scope": "district",
                "district": BURST_DISTRICT,
                "document": community_first,
            },
        )
        assert code == 201, district
        idents = [f"8600000000071{n:02d}" for n in range(12)]
        sub_ids = {}
        for n, ident in enumerate(idents):
            extra: dict = {"contacts": CONTACTS}
            if n % 3 == 1:
                extra["district"] = BURST_DISTRICT
            if n == 11:
                extra["contacts"] = []  # nobody to call: straight to the 120 relay decision
            sub_ids[ident] = await server.subscriber(ident, **extra)
        own = {"kinds": ["sos"], "steps": [{"tier": "family", "targets": "all", "wait_s": 30}]}
        code, override = await server.post(
            "/api/v1/policies",
            {
                "name": "own",
                "scope": "subscriber",
                "subscriber_id": sub_ids[idents[0]],
                "document": own,
            },
        )
        assert code == 201, override
        frames = []
        for ident in idents:
            codec = NativeTerminalCodec(ident)
            client = RawClient(server.ports["native"])
            client.send(codec.login())
            assert await _reply(client)
            clients.append(client)
            frames.append(codec.sos(ev.SosTrigger.BUTTON, None, 1_800_000_000, 80)[0])
        for client, frame in zip(clients, frames, strict=True):  # all in one reactor turn
            client.send(frame)
        for client in clients:
            assert await _reply(client)  # ACKed: stored
        # First waves: 11 terminals with contacts; idents[0] calls both family members.
        await responders.wait_for(lambda _line: len(_calls(responders)) >= 12, 30)
        code, queue = await server.get("/api/v1/incidents")
        items = {i["device_ident"]: i for i in queue["items"]}
        assert sorted(items) == idents
        expect_first = {}
        for n, ident in enumerate(idents):
            if n == 0:
                expect_first[ident] = (override["id"], [("family", FAMILY1), ("family", FAMILY2)])
            elif n == 11:
                expect_first[ident] = (None, [])
            elif n % 3 == 1:
                expect_first[ident] = (district["id"], [("community", "13900000003")])
            else:
                expect_first[ident] = (None, [("family", FAMILY1)])
        for ident, (policy_id, first) in expect_first.items():
            incident = await _until(
                server,
                items[ident]["id"],
                lambda i, first=first: (
                    len(_notified(i)) >= len(first)
                    and any(t["action"] == "escalation_started" for t in i["timeline"])
                ),
            )
            actions = [t["action"] for t in incident["timeline"]]
            assert actions.count("escalation_started") == 1, (ident, actions)
            assert _notified(incident) == first, ident
            if policy_id is not None:
                assert incident["policy_id"] == policy_id, ident
            else:  # the global alarm policy _setup saved (version 2 over the default)
                assert incident["policy_id"] not in (override["id"], district["id"]), ident
                assert incident["policy_version"] >= 2, ident
            if not first:
                assert "relay_pending" in actions, actions
        await sleep(1.0)
        calls = Counter(
            (line["incident"], line["phone"]) for line in responders.lines if "phone" in line
        )
        assert len(calls) == 12 and set(calls.values()) == {1}  # each first-wave call once
    finally:
        for client in clients:
            client.close()
        await stop_server(server)
        await responders.stop()


@pytest_twisted.ensureDeferred
async def test_c_sigkill_mid_escalation_resumes_without_repeats(db_url, tmp_path):
    """SIGKILL during a wait; after restart the due step fires once, marked late."""
    responders, hook_port = await start_responders(
        tmp_path,
        {
            FAMILY1: {"answer": "never"},
            FAMILY2: {"answer": "accept", "after": 0.3},
            "*": {"answer": "never"},
        },
    )
    http, native = free_port(), free_port()
    env = {
        "DISPATCH_DB": db_url,
        "DISPATCH_HTTP_PORT": str(http),
        "DISPATCH_NATIVE_PORT": str(native),
        "DISPATCH_GT06_PORT": "0",
        "DISPATCH_JT808_PORT": "0",
        "DISPATCH_WEBHOOK_URL": f"http://127.0.0.1:{hook_port}/",
        "DISPATCH_WEBHOOK_SECRET": SECRET,
    }
    dbmod.upgrade(db_url)
    engine = dbmod.make_engine(db_url)
    from sqlalchemy.orm import Session

    with Session(engine) as session, session.begin():
        token = tokens.create_token(session, "admin", "ops", None, datetime.now(UTC))
    engine.dispose()
    base = f"http://127.0.0.1:{http}"
    auth = {"Authorization": f"Bearer {token}"}

    async def up() -> LineCollector:
        proc = LineCollector().spawn(["-m", "dispatch", "serve"], env)
        for _ in range(300):
            try:
                resp = await wait(treq.get(base + "/healthz"), 2)
                if resp.code == 200:
                    return proc
            except Exception:
                pass
            await sleep(0.1)
        raise AssertionError(proc.err.decode())

    server = await up()
    try:
        resp = await wait(treq.post(base + "/api/v1/policies", json=policy(wait_s=4), headers=auth))
        assert resp.code == 201
        sub = {
            "name": "王奶奶",
            "district": "鹿城区",
            "address": "五马街1号",
            "contacts": CONTACTS,
            "device": {"protocol": "native", "ident": IDENT},
        }
        resp = await wait(treq.post(base + "/api/v1/subscribers", json=sub, headers=auth))
        assert resp.code == 201
        code, lines = await run_terminal(
            "--server", f"127.0.0.1:{native}", "--ident", IDENT, "--sos-after", "0.2"
        )
        assert code == 0
        await responders.wait_for(lambda line: line.get("phone") == FAMILY1)
        await server.stop("KILL")
        await sleep(5.0)  # the second family step comes due while the server is down
        assert _calls(responders) == [FAMILY1]
        server = await up()
        await responders.wait_for(lambda line: line.get("callback") is not None, 20)
        resp = await wait(treq.get(base + "/api/v1/incidents", headers=auth))
        [item] = (await wait(resp.json()))["items"]
        for _ in range(100):
            resp = await wait(treq.get(base + f"/api/v1/incidents/{item['id']}", headers=auth))
            incident = await wait(resp.json())
            if incident["status"] == "acknowledged":
                break
            await sleep(0.1)
        assert incident["status"] == "acknowledged"
        assert _notified(incident) == [("family", FAMILY1), ("family", FAMILY2)]
        late = [t for t in incident["timeline"] if t["action"] == "notify"][1]
        assert late["detail"]["late"] is True
        assert _calls(responders) == [FAMILY1, FAMILY2]
    finally:
        await server.stop("TERM")
        await responders.stop()
