"""Connections per process: memory and CPU of 19,000 heartbeating terminals (smoke: 500).

For the baseline server and then for ``dispatch serve`` (SQLite, pinned to CPU 0),
one fleet (CPU 1, several loopback source addresses) logs every terminal in and
heartbeats each every 60 s at its own phase.  Server RSS (VmRSS) is read before the
fleet connects and again after it has settled and after a window of steady state;
(after - before) / terminals is the cost of one connection.  The server's CPU share
is measured over the window (a full window is one heartbeat interval, so every
terminal beats once in it).  Open files of the server are read too (the limit here
is 20,000 per process).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from benchmarks import (
    BaselineServer,
    DispatchServer,
    Meter,
    open_fds,
    rss_kib,
    run_fleet,
    seeded_sqlite,
    sleep_until,
    target,
    workspace,
)

SIZES = {
    "smoke": {"terminals": 500, "heartbeat": 60.0, "settle": 1.0, "window": 2.0, "sources": 2},
    "full": {"terminals": 19000, "heartbeat": 60.0, "settle": 15.0, "window": 60.0, "sources": 8},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--terminals", type=int, default=None, help="override the size's count")


def _hold(work: Path, server: Any, label: str, size: dict[str, Any]) -> dict[str, Any]:
    time.sleep(1.0)  # let start-up allocations settle
    before = rss_kib(server.pid)
    fds_before = open_fds(server.pid)
    seen: dict[str, Any] = {}

    def on_event(line: dict[str, Any]) -> None:
        if line["event"] != "ready":
            return
        ready = time.monotonic()
        seen["ramp_s"] = line["ramp_s"]
        sleep_until(ready + size["settle"])
        seen["rss_settled"] = rss_kib(server.pid)
        seen["fds"] = open_fds(server.pid)
        meter = Meter({"server": server.pid})
        sleep_until(ready + size["settle"] + size["window"])
        seen["cpu"] = meter.read()
        seen["rss_after"] = rss_kib(server.pid)

    n = size["terminals"]
    report = run_fleet(
        work,
        server.native_port,
        [
            "--count",
            str(n),
            "--heartbeat",
            str(size["heartbeat"]),
            "--duration",
            str(size["settle"] + size["window"] + 1.0),
            "--source-count",
            str(size["sources"]),
            "--ramp-timeout",
            "600",
            "--drain",
            "0",
            "--no-presses",
        ],
        name=f"fleet-{label}",
        on_event=on_event,
        timeout=900,
    )
    logged_in = report["connects"]["logged_in"]
    after = seen.get("rss_after", 0)
    per_conn = (after - before) / logged_in if logged_in else None
    cpu = seen.get("cpu", {})
    return {
        "terminals": n,
        "logged_in": logged_in,
        "ramp_s": seen.get("ramp_s"),
        "rss_before_kib": before,
        "rss_settled_kib": seen.get("rss_settled"),
        "rss_after_kib": after,
        "kib_per_connection": round(per_conn, 3) if per_conn is not None else None,
        "open_files_before": fds_before,
        "open_files_held": seen.get("fds"),
        "cpu_share": cpu.get("cpu_share", {}).get("server"),
        "cpu_window_s": cpu.get("seconds"),
        "machine_busy_cores": cpu.get("machine_busy_cores"),
        "per_cpu": cpu.get("per_cpu"),
        "heartbeats_acked": report["heartbeats"]["acked"],
        "lost": report["connects"]["lost"],
        "connect_failed": report["connects"]["failed"],
        "fleet_command": report["command"],
        "fleet_nofile": report["nofile"],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    size = dict(SIZES[args.size])
    if args.terminals:
        size["terminals"] = args.terminals
    n = size["terminals"]
    out: dict[str, Any] = {}
    with workspace(args.keep) as work:
        db = work / "dispatch.db"
        seed = seeded_sqlite(db, n)
        baseline = BaselineServer(work)
        try:
            out["baseline"] = _hold(work, baseline, "baseline", size)
        finally:
            baseline.stop()
        dispatch = DispatchServer(work, f"sqlite:///{db}")
        try:
            out["dispatch"] = _hold(work, dispatch, "dispatch", size)
        finally:
            dispatch.stop(60)
        commands = {"baseline": baseline.command, "dispatch": dispatch.command}
    b, d = out["baseline"], out["dispatch"]
    ratio = (
        d["kib_per_connection"] / b["kib_per_connection"]
        if d["kib_per_connection"] and b["kib_per_connection"]
        else None
    )
    figures = {
        "terminals": n,
        "heartbeat_s": size["heartbeat"],
        "dispatch_kib_per_connection": d["kib_per_connection"],
        "baseline_kib_per_connection": b["kib_per_connection"],
        "memory_ratio": round(ratio, 2) if ratio else None,
        "dispatch_cpu_share": d["cpu_share"],
        "baseline_cpu_share": b["cpu_share"],
        "cpu_window_s": size["window"],
        "dispatch_open_files": d["open_files_held"],
        "dispatch_logged_in": d["logged_in"],
        "dispatch_login_ramp_s": d["ramp_s"],
        "dispatch_rss_mib": round(d["rss_after_kib"] / 1024, 1),
    }
    per = d["kib_per_connection"]
    return {
        "figures": figures,
        "targets": [
            target("dispatch KiB per connection", per, "<= 4", None if per is None else per <= 4),
        ],
        "notes": [
            "RSS after minus RSS before the fleet connected, divided by logged-in terminals: "
            "includes everything the logins grew (live state, SQLAlchemy/SQLite caches, "
            "allocator slack), not only socket objects.",
        ],
        "servers": commands,
        "seed": seed,
        "baseline": b,
        "dispatch": d,
    }
