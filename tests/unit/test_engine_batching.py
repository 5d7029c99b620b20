"""Batching in the escalation engine: due timers fire in shared transactions, a failing
batch loses nothing, incidents opened together are planned with a constant number of
statements and store exactly what planning them one by one stores, and planning and
firing take turns so neither starves the other."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, select

from dispatch.routing import engine as engine_mod
from dispatch.store import escalation as repo
from dispatch.store import incidents as incident_repo
from dispatch.store import subscribers as subscriber_repo
from dispatch.store.models import (
    Attempt,
    Device,
    Escalation,
    EscalationTimer,
    Incident,
    TimelineEntry,
)
from tests.conftest import reset_pg
from tests.unit.fakes import DISTRICT, seed_subscriber
from tests.unit.test_engine import COMMUNITY_FIRST, World, result_of, run


@pytest.fixture
def bench(sqlite_url: str) -> Any:
    """A started engine (see test_engine.World) to add incidents to."""
    w = World(sqlite_url)
    yield w
    w.close()


def _incident(w: World, ident: str) -> int:
    sub_id, device_id = seed_subscriber(w.db, ident)
    sos = incident_repo.SosInput(
        device_id=device_id,
        device_ident=ident,
        subscriber_id=sub_id,
        seq=1,
        kind="sos",
        received_at=w.now(),
    )
    record = result_of(w.db.write(incident_repo.record_sos, sos, timedelta(minutes=5)))
    return record.incident_id


def test_timers_due_together_share_one_transaction(bench: World) -> None:
    """Three incidents planned at the same instant: their first waves fire in one write."""
    ids = [_incident(bench, f"86000000000010{n}") for n in range(3)]
    for iid in ids:
        run(bench.engine.start_incident(iid))
    before = bench.db.count_calls(fn_name="fire_timers")
    bench.clock.advance(0)
    assert bench.db.count_calls(fn_name="fire_timers") - before == 1
    assert all(bench.actions(iid, "notify") for iid in ids)


def test_failed_batch_falls_back_to_single_timers_and_loses_nothing(bench: World) -> None:
    """The batch write fails: each timer is fired on its own and every wave goes out once."""
    ids = [_incident(bench, f"86000000000020{n}") for n in range(2)]
    for iid in ids:
        run(bench.engine.start_incident(iid))
    bench.db.fail_next = {"write"}
    bench.clock.advance(0)
    for iid in ids:
        notes = bench.actions(iid, "notify")
        assert len(notes) == 2  # voice and SMS to the first contact, once each
    assert bench.db.count_calls(fn_name="fire_timers") >= 3  # the failed batch + two singles


# --- batch planning stores exactly what planning one by one stores ----------------------------

OUHAI, LONGWAN = "瓯海区", "龙湾区"
DISTRICT_POLICY = {
    "kinds": ["sos", "fall"],
    "relay_deadline_s": 120,
    "steps": [
        {"tier": "community", "targets": "on_duty", "channels": ["voice", "sms"], "wait_s": 30},
        {
            "tier": "family",
            "targets": "in_order",
            "channels": ["voice"],
            "wait_s": 20,
            "when": {"lives_alone": True},
        },
        {"tier": "family", "targets": "all", "channels": ["sms"], "wait_s": 20},
        {"tier": "relay_120", "wait_s": 60},
        {"tier": "operator", "wait_s": 0},
    ],
}
OWN_POLICY = {
    "kinds": ["sos"],
    "steps": [
        {"tier": "family", "targets": "all", "channels": ["sms"], "wait_s": 45, "rounds": 2},
        {"tier": "operator", "wait_s": 0},
    ],
}
CARE_POLICY = {
    "kinds": ["care_missed"],
    "steps": [{"tier": "community", "channels": ["voice"], "wait_s": 600}],
}
FAMILY = [
    {"name": "Son", "phone": "13911110001", "relation": "son"},
    {"name": "Daughter", "phone": "13911110002", "relation": "daughter"},
]
WORKER = [{"name": "Worker", "phone": "13911110009", "relation": "worker", "tier": "community"}]


def _subscriber(
    w: World, n: int, district: str, contacts: list[dict[str, Any]], **extra: Any
) -> tuple[int, int]:
    """One more subscriber (with terminal 86000000000100n) in ``district``."""
    ident = f"8600000000010{n:02d}"
    body = {
        "name": f"Subscriber {n}",
        "district": district,
        "address": f"{n} Test Road",
        "contacts": contacts,
        "device": {"protocol": "native", "ident": ident},
        **extra,
    }
    with w.db.session_sync() as s, s.begin():
        sub_id = subscriber_repo.create_subscriber(s, body, w.now() - timedelta(days=30))
        device_id = s.scalar(select(Device.id).where(Device.ident == ident))
    return sub_id, device_id


def _sos(w: World, device_id: int, sub_id: int | None, kind: str = "sos") -> int:
    sos = incident_repo.SosInput(
        device_id=device_id,
        device_ident=f"device {device_id}",
        subscriber_id=sub_id,
        seq=1,
        kind=kind,
        received_at=w.now(),
        lat=28.0 if sub_id and sub_id % 2 else None,
        lon=120.6 if sub_id and sub_id % 2 else None,
    )
    return result_of(w.db.write(incident_repo.record_sos, sos, timedelta(minutes=5))).incident_id


def _raw_incident(w: World, kind: str, sub_id: int | None, created_at: datetime) -> int:
    """An incident as the care scheduler opens them (no SOS frame, maybe no subscriber)."""
    with w.db.session_sync() as s, s.begin():
        inc = Incident(
            kind=kind,
            status="open",
            priority=2,
            subscriber_id=sub_id,
            created_at=created_at,
            updated_at=created_at,
        )
        s.add(inc)
        s.flush()
        return inc.id


def _populate(w: World) -> list[int]:
    """A mixed batch; returns the ids to hand to planning (duplicates and strays included)."""
    # World's own subscriber (鹿城区: 2 family, 1 community) falls under a district policy.
    w.save_policy("lucheng", "district", DISTRICT_POLICY, district=DISTRICT)
    w.save_policy("ouhai", "district", COMMUNITY_FIRST, district=OUHAI)
    w.save_policy("ouhai care", "district", CARE_POLICY, district=OUHAI)
    lucheng_alone = _subscriber(w, 1, DISTRICT, FAMILY + WORKER, living_situation="alone")
    lucheng_own = _subscriber(w, 2, DISTRICT, FAMILY + WORKER)
    w.save_policy("own", "subscriber", OWN_POLICY, subscriber_id=lucheng_own[0])
    broken = _subscriber(w, 3, DISTRICT, FAMILY)
    # A stored override that no longer parses is skipped for the district's policy.
    w.save_policy("broken", "subscriber", {"kinds": ["sos"], "steps": []}, subscriber_id=broken[0])
    ouhai_worker_only = _subscriber(w, 4, OUHAI, WORKER)  # no family contact at all
    ouhai_nobody = _subscriber(w, 5, OUHAI, [])  # no contacts at all
    ouhai_family_only = _subscriber(w, 6, OUHAI, FAMILY)  # district step has nobody: skipped
    longwan = _subscriber(w, 7, LONGWAN, FAMILY + WORKER)  # no district policy: global
    longwan_2 = _subscriber(w, 8, LONGWAN, list(reversed(FAMILY)))
    # Saved after the older one: two versions, only the newest active and used.
    w.save_policy(
        "own", "subscriber", OWN_POLICY | {"relay_deadline_s": 90}, subscriber_id=lucheng_own[0]
    )

    already = w.sos()
    w.begin(already)  # planned and its first wave sent before the batch
    ids = [
        _sos(w, *reversed(lucheng_alone)),
        _sos(w, *reversed(lucheng_own)),
        _sos(w, *reversed(broken)),
        _sos(w, *reversed(ouhai_worker_only)),
        _sos(w, *reversed(ouhai_nobody)),
        _sos(w, *reversed(ouhai_family_only), kind="fall"),
        _sos(w, *reversed(longwan)),
        _sos(w, *reversed(longwan_2)),
        _raw_incident(w, "care_missed", ouhai_family_only[0], w.now()),
        _raw_incident(w, "care_missed", longwan[0], w.now()),
        _raw_incident(w, "offline", None, w.now()),  # nobody to call: global offline policy
        # Opened at 23:00 local time: the night ladder, whenever it is planned.
        _raw_incident(w, "sos", longwan_2[0], w.now() - timedelta(hours=11)),
    ]
    resolved = _raw_incident(w, "sos", longwan[0], w.now())
    w.operator(resolved, "resolve", outcome="false_alarm")
    return [already, *ids, ids[0], resolved, 999_999, ids[3]]


def _stored(w: World) -> dict[str, Any]:
    """Everything planning and firing store, with random attempt ids replaced by their place."""

    def read(s: Any) -> dict[str, Any]:
        attempts = s.scalars(select(Attempt)).all()
        place = {a.id: (a.incident_id, a.wave, a.channel, a.phone) for a in attempts}
        # As stored, not only as read back: JSON null and SQL NULL both read back as None.
        raw_null = s.scalars(select(TimelineEntry.id).where(TimelineEntry.detail.is_(None))).all()
        timeline = []
        for e in s.scalars(select(TimelineEntry).order_by(TimelineEntry.id)):
            detail = dict(e.detail) if e.detail else e.detail
            if detail and "attempt" in detail:
                detail["attempt"] = place[detail["attempt"]]
            timeline.append(
                (
                    e.id,
                    e.incident_id,
                    e.at,
                    e.action,
                    e.tier,
                    e.target,
                    e.channel,
                    e.outcome,
                    e.actor,
                    detail,
                )
            )
        return {
            "incidents": [
                (i.id, i.kind, i.status, i.policy_id, i.policy_version, i.updated_at)
                for i in s.scalars(select(Incident).order_by(Incident.id))
            ],
            "escalations": [
                (e.incident_id, e.plan, e.cursor, e.state, e.relay_confirmed, e.started_at)
                for e in s.scalars(select(Escalation).order_by(Escalation.incident_id))
            ],
            "timers": [
                (t.id, t.incident_id, t.kind, t.wave, t.due_at, t.status, t.fired_at)
                for t in s.scalars(select(EscalationTimer).order_by(EscalationTimer.id))
            ],
            "timeline": timeline,
            "timeline_detail_sql_null": raw_null,
            "attempts": sorted(
                (
                    a.incident_id,
                    a.wave,
                    a.tier,
                    a.channel,
                    a.target_name,
                    a.phone,
                    a.status,
                    a.created_at,
                    a.answered_at,
                )
                for a in attempts
            ),
            "calls": [
                (
                    r.incident_id,
                    r.tier,
                    r.channel,
                    r.phone,
                    r.name,
                    r.message,
                    r.subscriber,
                    place[r.attempt_id],
                )
                for r in w.channel.requests
            ],
        }

    return w.db.query(read)


def _fire_one_by_one(session: Any, timer_ids: list[int], now: datetime) -> list[repo.Fired]:
    """The reference for ``fire_timers``: ``fire_timer`` row by row in one transaction."""
    return [f for f in (repo.fire_timer(session, t, now) for t in timer_ids) if f is not None]


def _calling(w: World, incident_id: int, wave: int) -> list[str]:
    """Ids of the attempts of one wave still calling, in a stable order."""
    return w.db.query(
        lambda s: list(
            s.scalars(
                select(Attempt.id)
                .where(
                    Attempt.incident_id == incident_id,
                    Attempt.wave == wave,
                    Attempt.status == "calling",
                )
                .order_by(Attempt.channel, Attempt.phone)
            )
        )
    )


def _run_ladder(w: World, ids: list[int], batch: bool) -> list[dict[str, Any]]:
    """Plan ``ids`` and run every ladder to its end, in batches or one by one.

    Snapshots after planning, after the first waves, after answers and after the end;
    the same answers, relay decisions and late steps happen in both runs.
    """
    w.channel.fail = {FAMILY[1]["phone"]}  # the daughter's phone is out of service
    if batch:
        run(w.engine._plan_batch(ids))
    else:
        for iid in ids:
            run(w.engine.start_incident(iid))
    snapshots = [_stored(w)]
    w.clock.advance(0)
    snapshots.append(_stored(w))
    for attempt_id in _calling(w, ids[1], 0):  # everyone of a first wave declines
        w.answer(attempt_id, "decline", "someone")
    w.answer(_calling(w, ids[7], 0)[0], "accept", "Son")
    w.clock.advance(0)
    snapshots.append(_stored(w))
    for _ in range(19):
        w.clock.advance(5)
    waiting = w.db.query(
        lambda s: list(
            s.scalars(
                select(Escalation.incident_id)
                .where(Escalation.state == "waiting_relay")
                .order_by(Escalation.incident_id)
            )
        )
    )
    assert len(waiting) >= 3, waiting  # relays waiting for an operator, in both runs
    w.operator(waiting[0], "relay_confirm")
    w.operator(waiting[1], "relay_skip")
    w.clock.advance(30)  # a stall: the steps due meanwhile fire late
    for _ in range(40):
        w.clock.advance(5)
    snapshots.append(_stored(w))
    return snapshots


def _fresh_url(db_url: str, n: int) -> str:
    """An empty database of the same backend (PostgreSQL: this process's schema, reset)."""
    if db_url.startswith("sqlite"):
        return db_url.replace("dispatch.db", f"dispatch-{n}.db")
    reset_pg()
    return db_url


def test_batch_planning_stores_exactly_what_one_by_one_does(db_url: str) -> None:
    """Districts, overrides, missing contacts, strays: same rows planned in a batch or singly."""
    results = {}
    for n, batch in enumerate((False, True)):
        w = World(_fresh_url(db_url, n))
        try:
            ids = _populate(w)
            before = len(w.db.calls)
            with pytest.MonkeyPatch.context() as mp:
                if not batch:
                    mp.setattr(repo, "fire_timers", _fire_one_by_one)
                results[batch] = _run_ladder(w, ids, batch)
            calls = [name for _, name in w.db.calls[before:]]
        finally:
            w.close()
        if batch:
            assert calls[:2] == ["start_contexts", "begin_escalations"]  # no fallback ran
            assert "fire_timers" in calls and "_fire_one_by_one" not in calls
        else:
            assert "fire_timers" not in calls and "_fire_one_by_one" in calls
    one, batched = results[False], results[True]
    for stage, (a, b) in enumerate(zip(one, batched, strict=True)):
        for table in a:
            assert a[table] == b[table], (stage, table)
    planned, *_, end = batched
    # Every path of the ladder was taken: failures, declines, relays, late steps.
    actions = Counter(e[3] for e in end["timeline"])
    for action in (
        "notify",
        "relay",
        "relay_pending",
        "relay_deadline_passed",
        "relay_confirm",
        "relay_skip",
        "operator_alerted",
        "escalation_exhausted",
        "answer",
    ):
        assert actions[action] > 0, action
    answers = {e[7] for e in end["timeline"] if e[3] == "answer"}
    assert answers == {"accepted", "declined", "failed"}
    assert any((e[9] or {}).get("late") for e in end["timeline"])
    # The mix really is mixed: every planned incident got its own plan, policies differ.
    assert len(planned["escalations"]) == 13  # 12 new + the one planned before
    assert len({(i[3], i[4]) for i in planned["incidents"] if i[3] is not None}) >= 5
    assert sum(e[3] == "escalation_started" for e in planned["timeline"]) == 13
    # One first wave each, and the second wave of the incident planned before.
    assert len(planned["timers"]) == 14 and len(end["calls"]) > 20


def test_planning_a_batch_costs_the_same_statements_for_5_or_50(sqlite_url: str) -> None:
    """start_contexts and begin_escalations: a constant number of statements per batch."""
    w = World(sqlite_url)
    try:
        w.save_policy("lucheng", "district", DISTRICT_POLICY, district=DISTRICT)
        w.save_policy("ouhai", "district", COMMUNITY_FIRST, district=OUHAI)
        ids = []
        for n in range(55):
            district = (DISTRICT, OUHAI, LONGWAN)[n % 3]
            sub_id, device_id = _subscriber(w, n, district, FAMILY + WORKER)
            if n % 5 == 0:
                w.save_policy(f"own {n}", "subscriber", OWN_POLICY, subscriber_id=sub_id)
            ids.append(_sos(w, device_id, sub_id))

        def cost(batch: list[int]) -> tuple[int, int, int]:
            seen: list[str] = []

            def count(_conn: Any, _cur: Any, statement: str, *_: Any) -> None:
                if not statement.startswith(("BEGIN", "COMMIT", "PRAGMA")):
                    seen.append(statement)

            for engine in w.db._engines:
                event.listen(engine, "before_cursor_execute", count)
            try:
                contexts = result_of(w.db.read(repo.start_contexts, batch))
                reads = len(seen)
                plans = [w.engine._plan(ctx) for ctx in contexts]
                timers = result_of(w.db.write(repo.begin_escalations, plans, w.now()))
            finally:
                for engine in w.db._engines:
                    event.remove(engine, "before_cursor_execute", count)
            assert len(timers) == len(batch)
            return reads, len(seen) - reads, len({p[1]["id"] for p in plans if p[1]})

        small, large = cost(ids[:5]), cost(ids[5:])
        # 5 reads: incidents, escalations, subscribers, contacts, policies.
        assert small[0] == large[0] == 5
        # 2 reads, 3 inserts (escalations, timeline, timers), 1 update of the policy chosen.
        assert small[1] == large[1] == 6
        assert large[2] > small[2] >= 2  # however many policies the batch mixes
    finally:
        w.close()


def test_planning_and_firing_take_turns(bench: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backlog of due timers and of new incidents: one batch of each in turn, none starved."""
    monkeypatch.setattr(engine_mod, "TIMER_BATCH", 2)
    monkeypatch.setattr(engine_mod, "PLAN_BATCH", 2)
    running = [_incident(bench, f"86000000000030{n}") for n in range(4)]
    for iid in running:
        run(bench.engine.start_incident(iid))  # 4 first waves due now, not yet fired
    new = [_incident(bench, f"86000000000040{n}") for n in range(4)]
    for iid in new:
        bench.engine.incident_opened(iid)
    before = len(bench.db.calls)
    bench.clock.advance(0)
    work = [
        name
        for _, name in bench.db.calls[before:]
        if name in ("fire_timers", "start_contexts", "begin_escalations")
    ]
    assert work == [
        "fire_timers",
        "start_contexts",
        "begin_escalations",
        "fire_timers",
        "start_contexts",
        "begin_escalations",
        # The first waves of the incidents just planned.
        "fire_timers",
        "fire_timers",
    ]
    for iid in running + new:
        assert len(bench.actions(iid, "notify")) == 2  # voice and SMS, once each
        assert len(bench.actions(iid, "escalation_started")) == 1


def test_planning_waits_for_alarms_still_being_committed(bench: World) -> None:
    """While SOS frames wait for the store, planning holds; it goes on once they are in."""
    from twisted.internet import defer

    pending: list[defer.Deferred] = []

    def alarms_pending() -> defer.Deferred | None:
        pending.append(defer.Deferred())
        return pending[-1]

    bench.engine.alarms_pending = alarms_pending
    iid = _incident(bench, "860000000000501")
    bench.engine.incident_opened(iid)
    bench.clock.advance(0)
    assert bench.db.count_calls(fn_name="start_contexts") == 0
    bench.engine.alarms_pending = None  # the burst is stored: nothing pending any more
    pending[0].callback(None)
    bench.clock.advance(0)
    assert len(bench.actions(iid, "escalation_started")) == 1
    assert len(bench.actions(iid, "notify")) == 2


def test_planning_waits_for_alarms_at_most_a_second(bench: World) -> None:
    """A store that never drains (a stuck commit) delays planning by at most 1 s."""
    from twisted.internet import defer

    bench.engine.alarms_pending = defer.Deferred
    iid = _incident(bench, "860000000000502")
    bench.engine.incident_opened(iid)
    bench.clock.advance(0)
    half = engine_mod.ALARMS_FIRST_MAX_S / 2  # halves of a power of two add up exactly
    bench.clock.advance(half)
    assert bench.db.count_calls(fn_name="start_contexts") == 0
    bench.clock.advance(half)
    assert bench.db.count_calls(fn_name="start_contexts") == 1
    assert len(bench.actions(iid, "escalation_started")) == 1


def test_incidents_closed_or_planned_after_the_read_are_skipped(bench: World) -> None:
    """Between the batch's read and its write one incident is resolved and one planned."""
    a, b, c = (_incident(bench, f"86000000000050{n}") for n in range(3))
    contexts = result_of(bench.db.read(repo.start_contexts, [a, b, c]))
    plans = [bench.engine._plan(ctx) for ctx in contexts]
    assert [p[0] for p in plans] == [a, b, c]
    bench.operator(b, "resolve", outcome="false_alarm")
    run(bench.engine.start_incident(c))
    timers = result_of(bench.db.write(repo.begin_escalations, [*plans, plans[0]], bench.now()))
    assert [t for t, _ in timers] == bench.db.query(
        lambda s: list(
            s.scalars(select(EscalationTimer.id).where(EscalationTimer.incident_id == a))
        )
    )
    assert [len(bench.actions(i, "escalation_started")) for i in (a, b, c)] == [1, 0, 1]
    assert bench.db.count(Escalation, Escalation.incident_id == b) == 0
    assert bench.pending_timers(c) == 1
