"""Store cost: database statements per login, per heartbeat and per SOS.

An in-process ``DispatchApp`` (native listener on an OS-chosen port, nothing else)
and an in-process fleet share one reactor.  Every statement the app's engines send
is counted with ``sqlalchemy.event.listen(engine, "before_cursor_execute")`` and
classified by verb, table and thread pool (the SOS path runs on the ``urgent``
pool); commits are counted with the ``commit`` event.  Phases:

1. login: every terminal logs in (until the flush after the last login);
2. heartbeats: a steady window of heartbeats every ``heartbeat`` seconds; the live
   state flusher batches the dirty devices every 2 s;
3. SOS: presses at 10/s from distinct terminals, each committed before its ACK,
   then the escalation engine starts each incident.

SQLite always; PostgreSQL only with ``--pg``.  That database is shared with the test
suite and other work, so the benchmark works in its own schema
(``dispatch_bench_<pid>``, via the search_path), created empty first and dropped at the
end; ``public`` is never touched.
"""

from __future__ import annotations

import argparse
import os
import re
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks import (
    drop_pg_schema,
    pg_problem,
    pg_schema_url,
    reset_pg,
    seed,
    seeded_sqlite,
    target,
    workspace,
)

SIZES = {
    "smoke": {"terminals": 100, "heartbeat": 2.0, "window": 2.0, "sos": 10, "settle": 1.0},
    "full": {"terminals": 1000, "heartbeat": 10.0, "window": 30.0, "sos": 200, "settle": 3.0},
}
SOS_RATE = 10.0
FLUSH = 2.0
WRITE_VERBS = ("INSERT", "UPDATE", "DELETE")
ESCALATION_TABLES = {"escalations", "escalation_timers", "attempts", "incident_timeline"}
_TABLE = [
    re.compile(r"^\s*(INSERT)\s+INTO\s+\"?(\w+)", re.I),
    re.compile(r"^\s*(UPDATE)\s+\"?(\w+)", re.I),
    re.compile(r"^\s*(DELETE)\s+FROM\s+\"?(\w+)", re.I),
    re.compile(r"^\s*(SELECT)\b.*?\bFROM\s+\"?(\w+)", re.I | re.S),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pg", action="store_true", help="also measure on PostgreSQL (in a private schema)"
    )
    p.add_argument(
        "--pg-url",
        default=os.environ.get(
            "DISPATCH_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1/test"
        ),
    )


def classify(statement: str) -> tuple[str, str]:
    """(verb, table) of a SQL statement; table is ``-`` when there is none."""
    for pattern in _TABLE:
        m = pattern.match(statement)
        if m:
            return m.group(1).upper(), m.group(2).lower()
    return statement.split(None, 1)[0].upper() if statement.strip() else "?", "-"


class StatementCounter:
    """Statements, rows and commits per (pool, verb, table), thread-safe."""

    def __init__(self) -> None:
        self.statements: Counter = Counter()
        self.rows: Counter = Counter()
        self.commits: Counter = Counter()
        self._lock = threading.Lock()

    def attach(self, engine: Any) -> None:
        from sqlalchemy import event

        event.listen(engine, "before_cursor_execute", self._statement)
        event.listen(engine, "commit", self._commit)

    @staticmethod
    def _pool() -> str:
        name = threading.current_thread().name
        if "urgent" in name:
            return "urgent"
        return "db" if name.startswith("PoolThread") else "other"

    def _statement(self, _conn, _cursor, statement, parameters, _ctx, executemany) -> None:
        verb, table = classify(statement)
        rows = len(parameters) if executemany and parameters else 1
        key = (self._pool(), verb, table)
        with self._lock:
            self.statements[key] += 1
            self.rows[key] += rows

    def _commit(self, _conn) -> None:
        with self._lock:
            self.commits[self._pool()] += 1

    def snapshot(self) -> dict[str, Counter]:
        with self._lock:
            return {
                "statements": Counter(self.statements),
                "rows": Counter(self.rows),
                "commits": Counter(self.commits),
            }


def _delta(after: dict[str, Counter], before: dict[str, Counter]) -> dict[str, Counter]:
    return {k: after[k] - before[k] for k in after}


def _sum(
    c: Counter,
    *,
    pool: str | None = None,
    verbs: tuple[str, ...] = WRITE_VERBS,
    tables: set[str] | None = None,
) -> int:
    return sum(
        n
        for (p, verb, table), n in c.items()
        if (pool is None or p == pool) and verb in verbs and (tables is None or table in tables)
    )


def _breakdown(d: dict[str, Counter]) -> dict[str, Any]:
    return {
        "statements": {"/".join(k): v for k, v in sorted(d["statements"].items())},
        "rows": {"/".join(k): v for k, v in sorted(d["rows"].items())},
        "commits": dict(d["commits"]),
    }


async def _scenario(reactor: Any, url: str, size: dict[str, Any], log: Path) -> dict[str, Any]:
    from twisted.internet import defer, task

    from dispatch import logs
    from dispatch.app import DispatchApp
    from dispatch.config import Config
    from simulators.fleet import Fleet, FleetOptions

    def sleep(s: float) -> defer.Deferred:
        return task.deferLater(reactor, s, lambda: None)

    async def until(pred: Any, timeout: float, what: str) -> None:
        deadline = reactor.seconds() + timeout
        while not pred():
            if reactor.seconds() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            await sleep(0.05)

    logs.configure("info", "json", stream=log.open("a"))
    cfg = Config(
        db=url,
        host="127.0.0.1",
        native_port=0,
        gt06_port=0,
        jt808_port=0,
        http_port=0,
        flush_interval=FLUSH,
    )
    app = DispatchApp(cfg, reactor, any_port=frozenset({"native"}))
    await app.start()
    counter = StatementCounter()
    counter.attach(app.db._read.kw["bind"])
    counter.attach(app.db._write.kw["bind"])
    if app.db._relaxed is not app.db._write:  # SQLite: live-state flushes use their own engine
        counter.attach(app.db._relaxed.kw["bind"])
    n = size["terminals"]
    opts = FleetOptions(
        port=app.ports["native"],
        count=n,
        heartbeat=size["heartbeat"],
        duration=3600,
        source_count=1,
        drain=10,
        keep_presses=False,
        ramp_timeout=120,
    )
    fleet = Fleet(reactor, opts)
    ready = defer.Deferred()
    fleet.on_event.append(lambda line: line["event"] == "ready" and ready.callback(line))
    s0 = counter.snapshot()
    done = fleet.run()
    try:
        line = await ready
        await sleep(FLUSH + 0.3)  # the flush of the login state
        s1 = counter.snapshot()
        hb0 = fleet.stats.hb_acked
        await sleep(size["window"])
        s2 = counter.snapshot()
        hb1 = fleet.stats.hb_acked
        m = size["sos"]
        for i in range(m):
            reactor.callLater(i / SOS_RATE, fleet.press, "trickle")
        await until(lambda: fleet.stats.sos_acked >= m, 60 + m / SOS_RATE, "SOS acks")
        await sleep(size["settle"])  # escalation start and first wave
        s3 = counter.snapshot()
    finally:
        fleet.stop()
        report = await done
        await app.stop()
    login, hb, sos = _delta(s1, s0), _delta(s2, s1), _delta(s3, s2)
    heartbeats = hb1 - hb0
    logged_in = report["connects"]["logged_in"]
    acked = fleet.stats.sos_acked
    per = lambda x, y: round(x / y, 4) if y else None  # noqa: E731
    return {
        "terminals": n,
        "logged_in": logged_in,
        "ramp_s": line["ramp_s"],
        "per_login": {
            "write_statements": per(_sum(login["statements"]), logged_in),
            "all_statements": per(sum(login["statements"].values()), logged_in),
            "commits": per(sum(login["commits"].values()), logged_in),
        },
        "heartbeats": heartbeats,
        "heartbeat_interval_s": size["heartbeat"],
        "per_heartbeat": {
            "write_statements": per(_sum(hb["statements"]), heartbeats),
            "rows_written": per(_sum(hb["rows"]), heartbeats),
            "commits": per(sum(hb["commits"].values()), heartbeats),
            "all_statements": per(sum(hb["statements"].values()), heartbeats),
        },
        "sos": acked,
        "per_sos": {
            "write_statements": per(_sum(sos["statements"], pool="urgent"), acked),
            "rows_written": per(_sum(sos["rows"], pool="urgent"), acked),
            "all_statements": per(
                _sum(
                    sos["statements"], pool="urgent", verbs=("INSERT", "UPDATE", "DELETE", "SELECT")
                ),
                acked,
            ),
            "commits": per(sos["commits"]["urgent"], acked),
        },
        "escalation_per_incident": {
            "write_statements": per(
                _sum(sos["statements"], pool="db", tables=ESCALATION_TABLES | {"incidents"}),
                acked,
            ),
            "commits_db_pool": per(sos["commits"]["db"], acked),
        },
        "breakdown": {
            "login": _breakdown(login),
            "heartbeat": _breakdown(hb),
            "sos": _breakdown(sos),
        },
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from twisted.internet import defer, reactor

    size = SIZES[args.size]
    out: dict[str, Any] = {}
    notes: list[str] = []
    with workspace(args.keep) as work:
        db = work / "dispatch.db"
        seeded = seeded_sqlite(db, size["terminals"])
        backends = [("sqlite", f"sqlite:///{db}")]
        schema = f"dispatch_bench_{os.getpid()}"
        if args.pg:
            problem = pg_problem(args.pg_url)
            if problem:
                raise RuntimeError(f"--pg given but PostgreSQL is not usable: {problem}")
            reset_pg(args.pg_url, schema)
            pg_url = pg_schema_url(args.pg_url, schema)
            took = seed(pg_url, size["terminals"])
            notes.append(
                f"PostgreSQL: fresh schema {schema} (dropped afterwards), {size['terminals']} "
                f"enrolled in {took:.1f}s"
            )
            backends.append(("postgresql", pg_url))
        else:
            notes.append("PostgreSQL not measured (pass --pg; it resets the shared test DB)")
        result: dict[str, Any] = {}

        async def main() -> None:
            for name, url in backends:
                out[name] = await _scenario(reactor, url, size, work / f"app-{name}.log")

        def go() -> None:
            d = defer.ensureDeferred(main())
            d.addBoth(lambda r: (result.update(value=r), reactor.stop()))

        reactor.callWhenRunning(go)
        try:
            reactor.run(installSignalHandlers=False)
        finally:
            if args.pg:
                drop_pg_schema(args.pg_url, schema)
        value = result.get("value")
        if value is not None and hasattr(value, "raiseException"):
            value.raiseException()
    figures: dict[str, Any] = {}
    targets = []
    for name, r in out.items():
        figures[name] = {
            "terminals": r["terminals"],
            "heartbeats": r["heartbeats"],
            "heartbeat_interval_s": r["heartbeat_interval_s"],
            "writes_per_heartbeat": r["per_heartbeat"]["write_statements"],
            "rows_per_heartbeat": r["per_heartbeat"]["rows_written"],
            "commits_per_heartbeat": r["per_heartbeat"]["commits"],
            "sos": r["sos"],
            "writes_per_sos": r["per_sos"]["write_statements"],
            "statements_per_sos": r["per_sos"]["all_statements"],
            "commits_per_sos": r["per_sos"]["commits"],
            "escalation_writes_per_incident": r["escalation_per_incident"]["write_statements"],
            "writes_per_login": r["per_login"]["write_statements"],
        }
        w = r["per_heartbeat"]["write_statements"]
        targets.append(
            target(
                f"{name}: write statements per heartbeat",
                w,
                "far below 1",
                None if w is None else w < 0.1,
                f"rows written per heartbeat: {r['per_heartbeat']['rows_written']}",
            )
        )
    notes.append(
        "A write statement is one INSERT/UPDATE/DELETE sent to the driver; an executemany "
        "batch counts once, its rows in rows_written."
    )
    return {
        "figures": figures,
        "targets": targets,
        "notes": notes,
        "seed": seeded,
        "flush_interval_s": FLUSH,
        "detail": out,
    }
