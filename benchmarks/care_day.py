"""A simulated day of care rounds for a city's subscribers (the care-round issue).

``python -m benchmarks care_day --size full`` enrols 300,000 subscribers living alone
(daily rounds, 09:00-11:00 Asia/Shanghai) straight into SQLite, then runs the real
``CareScheduler`` and store on a ``task.Clock`` through 24 simulated hours.  Terminals
are stubs that answer each prompt after 20 s (95 % ok, 5 % never, to exercise retries
and misses).  Reported: CPU seconds and peak memory the scheduler and its store spent
on the day, the planning time, and the most prompts sent in any one second.
"""

from __future__ import annotations

import argparse
import resource
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks import target, workspace

SIZES = {"smoke": {"subscribers": 300}, "full": {"subscribers": 300_000}}
DAY_START = datetime(2026, 12, 6, 16, 0, tzinfo=UTC)  # 00:00 local on the 7th


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subscribers", type=int, default=None, help="override the size")


class SyncDb:
    """The store's interface, run synchronously: the clock, not threads, drives the day."""

    def __init__(self, url: str) -> None:
        from sqlalchemy.orm import sessionmaker

        from dispatch.store import db as dbmod

        self.engine = dbmod.make_engine(url, immediate=True)
        self.factory = sessionmaker(self.engine, expire_on_commit=False)
        self.writes = 0

    def _run(self, fn: Any, *args: Any) -> Any:
        from twisted.internet import defer

        try:
            with self.factory() as session, session.begin():
                return defer.succeed(fn(session, *args))
        except Exception:
            return defer.fail()

    def read(self, fn: Any, *args: Any) -> Any:
        return self._run(fn, *args)

    def write(self, fn: Any, *args: Any) -> Any:
        self.writes += 1
        return self._run(fn, *args)

    urgent = write


def _seed(url: str, n: int) -> float:
    """Bulk-insert ``n`` subscribers living alone, each with a native terminal."""
    from sqlalchemy import insert
    from sqlalchemy.orm import Session

    from dispatch.districts import DISTRICTS
    from dispatch.store import db as dbmod
    from dispatch.store.models import Device, Subscriber

    t0 = time.monotonic()
    dbmod.upgrade(url)
    engine = dbmod.make_engine(url)
    now = DAY_START - timedelta(days=30)
    districts = list(DISTRICTS)
    with Session(engine) as session:
        for lo in range(0, n, 10_000):
            ids = range(lo + 1, min(n, lo + 10_000) + 1)
            session.execute(
                insert(Subscriber),
                [
                    {
                        "id": i,
                        "name": f"s{i}",
                        "district": districts[i % len(districts)],
                        "address": "-",
                        "phone": f"137{i:08d}",
                        "living_situation": "alone",
                        "status": "active",
                        "created_at": now,
                        "updated_at": now,
                    }
                    for i in ids
                ],
            )
            session.execute(
                insert(Device),
                [
                    {
                        "id": i,
                        "ident": f"86{i:013d}",
                        "protocol": "native",
                        "subscriber_id": i,
                        "online": True,
                        "last_seen": now,
                        "created_at": now,
                    }
                    for i in ids
                ],
            )
            session.commit()
    engine.dispose()
    return time.monotonic() - t0


class _Link:
    protocol = "native"

    def __init__(self, world: _World, ident: str) -> None:
        self.world, self.ident = world, ident

    def send_command(self, command: Any) -> bool:
        self.world.prompted(self.ident, command)
        return True


class _Links(dict):
    """Every terminal is online: a link exists for any ident asked for."""

    def __init__(self, world: _World) -> None:
        super().__init__()
        self.world = world

    def get(self, ident: str, default: Any = None) -> Any:
        return _Link(self.world, ident)


class _Engine:
    def __init__(self) -> None:
        self.opened = 0

    def incident_opened(self, incident_id: int) -> None:
        self.opened += 1


class _Device:
    def __init__(self, subscriber_id: int) -> None:
        self.subscriber_id = subscriber_id


class _World:
    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.per_second: Counter[int] = Counter()
        self.scheduler: Any = None

    def prompted(self, ident: str, command: Any) -> None:
        from dispatch import events as ev

        self.per_second[int(self.clock.seconds())] += 1
        sid = int(ident[2:])
        if sid % 20 == 0:
            return  # 5 % never answer: retries, then care_missed
        answer = ev.CareCheckAnswer(ident, command.round_id, ev.CareAnswer.OK)
        self.clock.callLater(20, self.scheduler.terminal_answer, answer, _Device(sid))


def _day(url: str) -> dict[str, Any]:
    from twisted.internet import task

    from dispatch.routing.care import CareConfig, CareScheduler

    clock = task.Clock()
    clock.advance(DAY_START.timestamp())
    db = SyncDb(url)
    world = _World(clock)
    engine = _Engine()

    class _Gateway:
        links = _Links(world)

    sched = CareScheduler(
        clock, db, _Gateway(), None, engine, callback_base="http://cb", config=CareConfig()
    )
    world.scheduler = sched
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    sched.start()  # plans every subscriber's round for the day
    plan_s = time.monotonic() - t0
    for _ in range(24 * 3600):
        clock.advance(1)
    sched.stop()
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from dispatch.store.models import CareRound

    with Session(db.engine) as session:
        states = dict(
            session.execute(select(CareRound.status, func.count()).group_by(CareRound.status)).all()
        )
    db.engine.dispose()
    return {
        "cpu_s": round(cpu, 2),
        "wall_s": round(time.monotonic() - t0, 2),
        "plan_s": round(plan_s, 2),
        "max_rss_mib": round(usage1.ru_maxrss / 1024, 1),
        "prompts": sum(world.per_second.values()),
        "max_prompts_in_one_second": max(world.per_second.values(), default=0),
        "busy_seconds": len(world.per_second),
        "rounds_by_status": states,
        "care_missed_incidents": engine.opened,
        "store_calls_write": db.writes,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    n = args.subscribers or SIZES[args.size]["subscribers"]
    with workspace(args.keep) as work:
        url = f"sqlite:///{Path(work) / 'care.db'}"
        seed_s = _seed(url, n)
        day = _day(url)
    per_k = round(day["cpu_s"] / n * 1000, 3)
    # Spread means close to the mean rate over the 2-hour window, never a spike.
    limit = max(5, round(3 * n / 7200))
    figures = {
        "subscribers": n,
        "seed_s": round(seed_s, 1),
        **day,
        "cpu_ms_per_subscriber_day": per_k,
    }
    return {
        "figures": figures,
        "targets": [
            target(
                "largest number of prompts in one second",
                day["max_prompts_in_one_second"],
                f"<= {limit} (3x the mean)",
                day["max_prompts_in_one_second"] <= limit,
                "daily 09:00-11:00 window; the mean is n / 7200 per second",
            ),
        ],
        "notes": [
            "Scheduler and store run synchronously on task.Clock, SQLite with "
            "synchronous=FULL: the CPU figure includes every commit of every prompt, "
            "answer, retry and miss of the day, and the planning of the next day's rounds.",
        ],
    }
