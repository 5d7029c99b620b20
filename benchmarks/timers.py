"""Timers: 10,000 incidents escalating at once on one process (smoke: 200).

An in-process ``DispatchApp`` (no listeners) on SQLite with a recording channel in
place of the real one.  A fast policy is saved (family voice, wait 1 s, two rounds;
then community voice, wait 1 s), so each incident has four durable timers (three
waves and the final "exhausted" step) and three notifications.  The incidents are
created directly in the store with ``record_sos``, then all of them are handed to the
engine at once: ``engine.incident_opened`` for each (what the gateway does; the engine
plans them in batches), or with ``--start one`` ``engine.start_incident`` for each.
For every fired timer:

* timer lateness = ``fired_at - due_at`` as stored (when the reactor ran the timer);
* notification lateness = when the channel got the call - ``due_at`` of the wave's
  timer (includes the queue for the database);
* first notification after hand-over = when the channel got an incident's first call -
  when the incidents were handed to the engine (``due_at`` of a first wave is set when
  the incident is planned, so lateness alone hides a slow planning).

Then every step must have fired exactly once: one ``notify`` timeline entry and one
channel call per attempt, one done timer per (incident, wave), one
``escalation_exhausted`` per incident.
"""

from __future__ import annotations

import argparse
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks import percentiles, seeded_sqlite, target, workspace

SIZES = {"smoke": {"incidents": 200, "timeout": 120}, "full": {"incidents": 10000, "timeout": 900}}
POLICY = {
    "name": "alarm",
    "kinds": ["sos", "fall"],
    "steps": [
        {"tier": "family", "targets": "in_order", "channels": ["voice"], "wait_s": 1, "rounds": 2},
        {"tier": "community", "targets": "in_order", "channels": ["voice"], "wait_s": 1},
    ],
}
WAVES = 3  # family, family, community
TIMERS = WAVES + 1  # + the step that finds nobody left


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--incidents", type=int, default=None, help="override the size's count")
    p.add_argument(
        "--start",
        choices=("batch", "one"),
        default="batch",
        help="batch: engine.incident_opened for each (what the gateway does; planned in "
        "batches); one: await engine.start_incident for each, all at once",
    )


class RecordingChannel:
    """Takes every call at once and remembers when it came."""

    name = "recording"

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.calls: list[tuple[str, int, str, float]] = []

    def send(self, request: Any) -> Any:
        from twisted.internet import defer

        self.calls.append(
            (request.attempt_id, request.incident_id, request.tier, self.clock.seconds())
        )
        return defer.succeed(True)


def _create_incidents(session: Any, first_device: int, count: int) -> list[int]:
    from sqlalchemy import select

    from dispatch.store.incidents import SosInput, record_sos
    from dispatch.store.models import Device

    rows = session.execute(
        select(Device.id, Device.ident, Device.subscriber_id)
        .where(Device.id >= first_device)
        .order_by(Device.id)
        .limit(count)
    ).all()
    now = datetime.now(UTC)
    ids = []
    for r in rows:
        sos = SosInput(
            device_id=r.id,
            device_ident=r.ident,
            subscriber_id=r.subscriber_id,
            seq=1,
            kind="sos",
            received_at=now,
            terminal_time=int(now.timestamp()),
        )
        ids.append(record_sos(session, sos, timedelta(hours=24)).incident_id)
    return ids


def _save_policy(session: Any) -> None:
    from dispatch.store.escalation import save_policy

    save_policy(session, "alarm", "global", None, None, POLICY, "benchmark", datetime.now(UTC))


def _escalation_count(session: Any) -> int:
    from sqlalchemy import func, select

    from dispatch.store.models import Escalation

    return session.scalar(select(func.count()).select_from(Escalation)) or 0


def _timer_counts(session: Any) -> tuple[int, int]:
    from sqlalchemy import func, select

    from dispatch.store.models import EscalationTimer

    total = session.scalar(select(func.count()).select_from(EscalationTimer)) or 0
    pending = session.scalar(
        select(func.count()).select_from(EscalationTimer).where(EscalationTimer.status == "pending")
    )
    return total, pending or 0


def _outcome(session: Any) -> dict[str, Any]:
    from sqlalchemy import select

    from dispatch.store.models import Attempt, EscalationTimer, TimelineEntry

    timers = session.execute(
        select(
            EscalationTimer.incident_id,
            EscalationTimer.kind,
            EscalationTimer.wave,
            EscalationTimer.due_at,
            EscalationTimer.fired_at,
            EscalationTimer.status,
        )
    ).all()
    attempts = session.execute(select(Attempt.id, Attempt.incident_id, Attempt.wave)).all()
    entries = session.execute(
        select(TimelineEntry.incident_id, TimelineEntry.action, TimelineEntry.detail).where(
            TimelineEntry.action.in_(("notify", "escalation_exhausted"))
        )
    ).all()
    return {"timers": timers, "attempts": attempts, "entries": entries}


async def _scenario(
    reactor: Any, url: str, n: int, timeout: float, log: Path, start: str
) -> dict[str, Any]:
    from twisted.internet import defer, task

    from dispatch import logs
    from dispatch.app import DispatchApp
    from dispatch.config import Config

    logs.configure("info", "json", stream=log.open("a"))
    cfg = Config(db=url, host="127.0.0.1", native_port=0, gt06_port=0, jt808_port=0, http_port=0)
    app = DispatchApp(cfg, reactor)
    await app.start()
    channel = RecordingChannel(reactor)
    app.engine.channel = channel
    try:
        await app.db.write(_save_policy)
        ids: list[int] = []
        t_create = reactor.seconds()
        while len(ids) < n:
            batch = min(1000, n - len(ids))
            got = await app.db.write(_create_incidents, len(ids) + 1, batch)
            if not got:
                raise RuntimeError(f"only {len(ids)} devices enrolled, {n} wanted")
            ids += got
        create_s = reactor.seconds() - t_create
        t0 = reactor.seconds()
        start_failures = 0
        if start == "batch" and hasattr(app.engine, "incident_opened"):
            # What the gateway does for each new incident: the engine plans them in batches.
            for i in ids:
                app.engine.incident_opened(i)
            while reactor.seconds() < t0 + timeout:
                if await app.db.read(_escalation_count) >= len(ids):
                    break
                await task.deferLater(reactor, 0.2, lambda: None)
        else:
            starts = [defer.ensureDeferred(app.engine.start_incident(i)) for i in ids]
            results = await defer.DeferredList(starts, consumeErrors=True)
            start_failures = sum(1 for ok, _ in results if not ok)
        started_s = reactor.seconds() - t0
        planned = await app.db.read(_escalation_count)
        deadline = t0 + timeout
        want = n * WAVES
        while len(channel.calls) < want and reactor.seconds() < deadline:
            await task.deferLater(reactor, 0.2, lambda: None)
        # The final "exhausted" step fires wait_s after the last wave: wait (bounded)
        # until the store has every timer and none is pending.
        while reactor.seconds() < deadline:
            total, pending = await app.db.read(_timer_counts)
            if total >= n * TIMERS and not pending:
                break
            await task.deferLater(reactor, 0.5, lambda: None)
        all_done_s = reactor.seconds() - t0
        outcome = await app.db.read(_outcome)
    finally:
        await app.stop()
    return {
        "incidents": len(ids),
        "create_s": round(create_s, 2),
        "start_all_s": round(started_s, 2),
        "all_done_s": round(all_done_s, 2),
        "start_failures": start_failures,
        "planned": planned,
        "start": start,
        "t0": t0,
        "timed_out": reactor.seconds() >= deadline,
        "calls": channel.calls,
        **outcome,
    }


def _analyse(r: dict[str, Any]) -> dict[str, Any]:
    n = r["incidents"]
    due: dict[tuple[int, int], datetime] = {}
    timer_late_ms = []
    per_step = Counter()
    not_done = 0
    for inc, kind, wave, due_at, fired_at, status in r["timers"]:
        per_step[(inc, kind, wave)] += 1
        if kind == "wave":
            due[(inc, wave)] = due_at
        if status != "done" or fired_at is None:
            not_done += 1
            continue
        timer_late_ms.append((fired_at - due_at).total_seconds() * 1000)
    attempt_wave = {a_id: (inc, wave) for a_id, inc, wave in r["attempts"]}
    sends = Counter(call[0] for call in r["calls"])
    notify_late_ms = []
    for attempt_id, _inc, _tier, t in r["calls"]:
        key = attempt_wave.get(attempt_id)
        if key is not None and key in due:
            notify_late_ms.append(t * 1000 - due[key].timestamp() * 1000)
    notify_entries = Counter()
    exhausted = Counter()
    for inc, action, detail in r["entries"]:
        if action == "notify":
            notify_entries[(detail or {}).get("attempt")] += 1
        else:
            exhausted[inc] += 1
    checks = {
        "timers": len(r["timers"]),
        "timers_expected": n * TIMERS,
        "timers_not_done": not_done,
        "steps_fired_more_than_once": sum(1 for c in per_step.values() if c > 1),
        "attempts": len(r["attempts"]),
        "attempts_expected": n * WAVES,
        "channel_calls": len(r["calls"]),
        "attempts_called_not_once": sum(1 for a_id in attempt_wave if sends.get(a_id, 0) != 1),
        "attempts_with_notify_entries_not_once": sum(
            1 for a_id in attempt_wave if notify_entries.get(a_id, 0) != 1
        ),
        "incidents_exhausted_once": sum(1 for c in exhausted.values() if c == 1),
    }
    ok = (
        checks["timers"] == checks["timers_expected"]
        and not_done == 0
        and checks["steps_fired_more_than_once"] == 0
        and checks["attempts"] == checks["attempts_expected"]
        and checks["channel_calls"] == checks["attempts_expected"]
        and checks["attempts_called_not_once"] == 0
        and checks["attempts_with_notify_entries_not_once"] == 0
        and checks["incidents_exhausted_once"] == n
    )
    first_wave = [
        t * 1000 - due[attempt_wave[a]].timestamp() * 1000
        for a, _i, _tier, t in r["calls"]
        if a in attempt_wave and attempt_wave[a][1] == 0 and attempt_wave[a] in due
    ]
    since_start = [
        t - r["t0"]
        for a, _i, _tier, t in r["calls"]
        if a in attempt_wave and attempt_wave[a][1] == 0
    ]
    return {
        "first_notification_after_handover_s": percentiles(since_start),
        "timer_lateness_ms": percentiles(timer_late_ms),
        "notification_lateness_ms": percentiles(notify_late_ms),
        "first_wave_notification_lateness_ms": percentiles(first_wave),
        "checks": checks,
        "exactly_once": ok,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from twisted.internet import defer, reactor

    size = dict(SIZES[args.size])
    n = args.incidents or size["incidents"]
    with workspace(args.keep) as work:
        db = work / "dispatch.db"
        seeded = seeded_sqlite(db, n)
        box: dict[str, Any] = {}

        def go() -> None:
            d = defer.ensureDeferred(
                _scenario(
                    reactor, f"sqlite:///{db}", n, size["timeout"], work / "app.log", args.start
                )
            )
            d.addBoth(lambda r: (box.update(value=r), reactor.stop()))

        reactor.callWhenRunning(go)
        reactor.run(installSignalHandlers=False)
        value = box.get("value")
        if value is None or hasattr(value, "raiseException"):
            value.raiseException() if value is not None else None
            raise RuntimeError("timers scenario did not finish")
    a = _analyse(value)
    p99 = a["timer_lateness_ms"]["p99"]
    np99 = a["notification_lateness_ms"]["p99"]
    figures = {
        "incidents": value["incidents"],
        "timers_fired": a["checks"]["timers"] - a["checks"]["timers_not_done"],
        "timer_lateness_ms": a["timer_lateness_ms"],
        "notification_lateness_ms": a["notification_lateness_ms"],
        "first_wave_notification_lateness_ms": a["first_wave_notification_lateness_ms"],
        "first_notification_after_handover_s": a["first_notification_after_handover_s"],
        "exactly_once": a["exactly_once"],
        "start": value["start"],
        "planned": value["planned"],
        "start_all_s": value["start_all_s"],
        "all_done_s": value["all_done_s"],
        "timed_out": value["timed_out"],
    }
    return {
        "figures": figures,
        "targets": [
            target(
                "timer lateness p99 (ms)",
                p99,
                "< 100",
                None if p99 is None else p99 < 100,
                "fired_at - due_at as stored",
            ),
            target(
                "notification lateness p99 (ms)",
                np99,
                "< 100",
                None if np99 is None else np99 < 100,
                "channel call - due_at",
            ),
            target("every step exactly once", a["exactly_once"], "true", a["exactly_once"]),
        ],
        "notes": [
            "Policy: family voice wait 1 s x2 rounds, community voice wait 1 s: 4 timers and "
            "3 notifications per incident; SQLite (synchronous=FULL), default pool sizes.",
        ],
        "checks": a["checks"],
        "seed": seeded,
        "create_incidents_s": value["create_s"],
        "start_failures": value["start_failures"],
    }
