"""Active care end to end: prompts to simulated terminals, answers, misses, voice fallback."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest_twisted

from tests.integration.harness import (
    SECRET,
    LineCollector,
    sleep,
    start_responders,
    start_server,
    stop_server,
)

FAST = {"answer_window_s": 5, "retries": 1, "retry_spacing_s": 5}
CONTACTS = [{"name": "大儿子", "phone": "13900000001", "relation": "son"}]


async def _enrol(server, ident: str, **extra) -> int:
    sid = await server.subscriber(ident, contacts=CONTACTS, phone="13700000000", **extra)
    code, body = await _put(server, f"/api/v1/subscribers/{sid}/care-plan", FAST)
    assert code == 200, body
    return sid


async def _put(server, path: str, body: dict):
    import json

    import treq

    from tests.integration.harness import wait

    resp = await wait(
        treq.request(
            "PUT",
            server.base + path,
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {server.token}"},
        )
    )
    return resp.code, json.loads(await wait(resp.content()))


def _terminal(server, ident: str, answer: str) -> LineCollector:
    return LineCollector().spawn(
        [
            "-m",
            "simulators.terminal",
            "--server",
            f"127.0.0.1:{server.ports['native']}",
            "--ident",
            ident,
            "--care-answer",
            answer,
            "--duration",
            "40",
        ]
    )


async def _rounds(server, sid: int, predicate, seconds: float = 30) -> list[dict]:
    for _ in range(int(seconds * 10)):
        code, body = await server.get(f"/api/v1/subscribers/{sid}/care")
        if predicate(body["items"]):
            return body["items"]
        await sleep(0.1)
    raise AssertionError(body)


@pytest_twisted.ensureDeferred
async def test_terminal_answers_ok_and_help(db_url):
    """One terminal answers ok (round closed), another answers help (SOS-grade incident)."""
    server = await start_server(db_url)
    terms = []
    try:
        ok_id = await _enrol(server, "860000000000011")
        help_id = await _enrol(server, "860000000000012")
        terms = [
            _terminal(server, "860000000000011", "ok"),
            _terminal(server, "860000000000012", "help"),
        ]
        for term in terms:
            await term.wait_for(lambda line: line["type"] == "logged_in")
        for sid in (ok_id, help_id):
            code, body = await server.post(f"/api/v1/subscribers/{sid}/care/check", {})
            assert code == 202, body
        ok_rounds = await _rounds(
            server, ok_id, lambda r: any(x["status"] == "answered" for x in r)
        )
        answered = [r for r in ok_rounds if r["status"] == "answered"][0]
        assert answered["answer"] == "ok" and answered["channel"] == "terminal"
        help_rounds = await _rounds(
            server, help_id, lambda r: any(x["answer"] == "help" for x in r)
        )
        incident_id = [r for r in help_rounds if r["answer"] == "help"][0]["incident_id"]
        code, incident = await server.get(f"/api/v1/incidents/{incident_id}")
        assert incident["kind"] == "sos" and incident["subscriber_id"] == help_id
        assert incident["timeline"][0]["action"] == "care_help"
        prompts = [line for line in terms[0].lines if line["type"] == "care_prompt"]
        assert prompts and prompts[0]["window_s"] == 5
        today = datetime.now(ZoneInfo("Asia/Shanghai")).date().isoformat()
        code, report = await server.get(
            f"/api/v1/reports/care?district=鹿城区&from={today}&to={today}"
        )
        [day] = report["days"]
        assert (day["answered"], day["missed"], day["answer_rate"]) == (2, 0, 1.0)
    finally:
        for term in terms:
            await term.stop()
        await stop_server(server)


@pytest_twisted.ensureDeferred
async def test_ignored_prompt_retries_then_care_missed_calls_family(db_url, tmp_path):
    """A terminal that never answers: retried once, then care_missed escalates to family."""
    responders, port = await start_responders(tmp_path, {"*": {"answer": "never"}})
    server = await start_server(
        db_url, webhook_url=f"http://127.0.0.1:{port}/", webhook_secret=SECRET
    )
    term = None
    try:
        sid = await _enrol(server, "860000000000013")
        term = _terminal(server, "860000000000013", "ignore")
        await term.wait_for(lambda line: line["type"] == "logged_in")
        await server.post(f"/api/v1/subscribers/{sid}/care/check", {})
        rounds = await _rounds(server, sid, lambda r: any(x["status"] == "missed" for x in r))
        missed = [r for r in rounds if r["status"] == "missed"][0]
        assert missed["attempts"] == 2  # the first prompt and one retry
        prompts = [line for line in term.lines if line["type"] == "care_prompt"]
        assert len(prompts) == 2
        code, incident = await server.get(f"/api/v1/incidents/{missed['incident_id']}")
        assert incident["kind"] == "care_missed"
        [call] = await responders.wait_for(lambda line: line.get("phone") == "13900000001")
        assert call["tier"] == "family" and call["incident"] == missed["incident_id"]
    finally:
        if term is not None:
            await term.stop()
        await stop_server(server)
        await responders.stop()


@pytest_twisted.ensureDeferred
async def test_offline_terminal_gets_a_voice_call(db_url, tmp_path):
    """With the terminal offline the round is a voice call; its accept closes the round ok."""
    responders, port = await start_responders(
        tmp_path, {"13700000000": {"answer": "accept", "after": 0.3}, "*": {"answer": "never"}}
    )
    server = await start_server(
        db_url, webhook_url=f"http://127.0.0.1:{port}/", webhook_secret=SECRET
    )
    try:
        sid = await _enrol(server, "860000000000014")
        await server.post(f"/api/v1/subscribers/{sid}/care/check", {})
        [call] = await responders.wait_for(lambda line: line.get("phone") == "13700000000")
        assert call["tier"] == "care"
        rounds = await _rounds(server, sid, lambda r: any(x["status"] == "answered" for x in r))
        answered = [r for r in rounds if r["status"] == "answered"][0]
        assert answered["channel"] == "voice" and answered["answer"] == "ok"
    finally:
        await stop_server(server)
        await responders.stop()


@pytest_twisted.ensureDeferred
async def test_care_plan_validation_and_report(db_url):
    """Bad care plans are 400s naming the problem; the report counts rounds per district."""
    server = await start_server(db_url)
    try:
        sid = await server.subscriber("860000000000015")
        for bad, word in (
            ({"window": ["11:00", "09:00"]}, "inverted"),
            ({"timezone": "Mars/Olympus"}, "time zone"),
            ({"cadence_days": 0}, "cadence_days"),
        ):
            code, err = await _put(server, f"/api/v1/subscribers/{sid}/care-plan", bad)
            assert code == 400 and word in err["detail"], err
        code, plan = await server.get(f"/api/v1/subscribers/{sid}/care-plan")
        assert plan["effective"]["cadence_days"] == 7  # not living alone: weekly
        code, report = await server.get("/api/v1/reports/care?from=2026-01-01&to=2026-01-02")
        assert code == 200 and report["days"] == []
        code, err = await server.get("/api/v1/reports/care?from=2026-01-05&to=2026-01-01")
        assert code == 400
    finally:
        await stop_server(server)


@pytest_twisted.ensureDeferred
async def test_restart_mid_round_loses_and_repeats_nothing(db_url):
    """Server stopped while a prompt waits; after restart the round is retried once, then
    missed: two prompts in all, one care_missed incident, and the report adds up."""
    server = await start_server(db_url)
    port = server.ports["native"]
    term = None
    try:
        sid = await _enrol(server, "860000000000016")
        term = _terminal(server, "860000000000016", "ignore")
        await term.wait_for(lambda line: line["type"] == "logged_in")
        await server.post(f"/api/v1/subscribers/{sid}/care/check", {})
        await term.wait_for(lambda line: line["type"] == "care_prompt")
        await stop_server(server)
        await sleep(8.0)  # the answer window expires (3 s late) while the server is down
        server = await start_server(db_url, ports={"native": port})
        rounds = await _rounds(
            server, sid, lambda r: any(x["status"] == "missed" for x in r), seconds=40
        )
        missed = [r for r in rounds if r["status"] == "missed"]
        assert len(missed) == 1 and missed[0]["attempts"] == 2
        assert missed[0]["late"] is True
        # The retry goes to the terminal if it has reconnected by then, else by voice call;
        # either way the first prompt is not repeated.
        prompts = [line for line in term.lines if line["type"] == "care_prompt"]
        assert 1 <= len(prompts) <= 2 and prompts[0]["round_id"] == missed[0]["id"]
        code, queue = await server.get("/api/v1/incidents?status=open")
        assert [i["kind"] for i in queue["items"]].count("care_missed") == 1
        today = datetime.now(ZoneInfo("Asia/Shanghai")).date().isoformat()
        code, report = await server.get(f"/api/v1/reports/care?from={today}&to={today}")
        [day] = report["days"]
        assert day["missed"] == 1 and day["answered"] == 0 and day["answer_rate"] == 0.0
    finally:
        if term is not None:
            await term.stop()
        await stop_server(server)
