"""SOS latency under load: a trickle and a burst of presses among heartbeating terminals.

``dispatch serve`` (SQLite, HTTP on for /metrics, CPU 0) holds 19,000 terminals
(smoke: 300) heartbeating every 60 s, driven by one fleet (CPU 1).  Once all are
logged in, a steady trickle of SOS presses (20/s for 30 s) and then a burst of
1,000 at once, every press from a different terminal, each resent every 5 s until
ACKed.  The fleet measures SOS frame sent -> ACK received.  The server's
``dispatch_escalation_first_notification_seconds`` histogram (incident created ->
notification handed to the channel), scraped before and after each phase, gives
the first-notification figure: the saved policy has one wave of one call, so every
incident is notified exactly once during the run.  Afterwards the database must
hold exactly one incident and one stored SOS frame per press: none lost (every
press ACKed), none duplicated.
"""

from __future__ import annotations

import argparse
import sqlite3
import time
from pathlib import Path
from typing import Any

from benchmarks import (
    DispatchServer,
    fraction_within,
    histogram,
    histogram_delta,
    histogram_quantile,
    run_fleet,
    save_policy,
    seeded_sqlite,
    sleep_until,
    target,
    workspace,
)

SIZES = {
    "smoke": {
        "terminals": 300,
        "rate": 10.0,
        "trickle": 30,
        "burst": 100,
        "settle": 1.0,
        "gap": 2.0,
        "sources": 1,
        "drain": 30.0,
        "notify_wait": 30.0,
    },
    "full": {
        "terminals": 19000,
        "rate": 20.0,
        "trickle": 600,
        "burst": 1000,
        "settle": 10.0,
        "gap": 6.0,
        "sources": 8,
        "drain": 60.0,
        "notify_wait": 180.0,
    },
}

# One wave, one call, a long wait: each incident is notified exactly once during the run.
POLICY = {
    "name": "alarm",
    "kinds": ["sos", "fall"],
    "steps": [
        {"tier": "family", "targets": "in_order", "channels": ["voice"], "wait_s": 3600},
        {"tier": "operator", "wait_s": 0},
    ],
}
NOTIFY = "dispatch_escalation_first_notification_seconds"
ACK = "dispatch_sos_ack_latency_seconds"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--terminals", type=int, default=None, help="override the size's count")


def _scrape(server: DispatchServer) -> dict[str, Any]:
    text = server.metrics()
    return {
        "notify": histogram(text, NOTIFY),
        "ack": histogram(text, ACK),
        # Diagnostics for the outliers: how long live-state flushes hold the write lock,
        # and how long the collector stops the reactor, by generation.
        "flush": histogram(text, "dispatch_live_flush_duration_seconds"),
        **{
            f"gc_gen{g}": histogram(text, "dispatch_gc_pause_seconds", f'generation="{g}"')
            for g in (0, 1, 2)
        },
        "t": time.time(),
    }


def _hist_figures(h: dict[str, Any]) -> dict[str, Any]:
    def ms(q: float) -> float | None:
        v = histogram_quantile(h, q)
        return None if v is None else round(v * 1000, 1)

    within = fraction_within(h, 0.1)
    finite = [le for le in h["buckets"] if le != float("inf")]
    top = max(finite) if finite else None
    beyond = h["count"] - h["buckets"].get(top, 0.0) if top is not None else 0.0
    return {
        "count": int(h["count"]),
        "p50_ms_est": ms(0.5),
        "p99_ms_est": ms(0.99),
        "share_within_100ms": None if within is None else round(within, 4),
        "beyond_last_bucket": int(beyond),
        "last_bucket_ms": None if top is None else top * 1000,
    }


def _db_counts(path: Path) -> dict[str, int]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:

        def one(sql: str) -> int:
            return int(con.execute(sql).fetchone()[0])

        return {
            "incidents": one("select count(*) from incidents where kind in ('sos','fall')"),
            "incident_devices": one(
                "select count(distinct device_id) from incidents where kind in ('sos','fall')"
            ),
            "sos_frames": one("select count(*) from sos_frames"),
            "alarm_entries": one("select count(*) from incident_timeline where action='alarm'"),
            "alarm_repeats": one(
                "select count(*) from incident_timeline where action='alarm_repeat'"
            ),
            "attempts": one("select count(*) from attempts"),
        }
    finally:
        con.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    size = dict(SIZES[args.size])
    if args.terminals:
        size["terminals"] = args.terminals
    n, rate, trickle, burst = size["terminals"], size["rate"], size["trickle"], size["burst"]
    trickle_end = size["settle"] + trickle / rate
    burst_at = trickle_end + size["gap"]
    scrapes: dict[str, Any] = {}
    with workspace(args.keep) as work:
        db = work / "dispatch.db"
        seed = seeded_sqlite(db, n)
        url = f"sqlite:///{db}"
        save_policy(url, POLICY)
        server = DispatchServer(work, url, http=True)
        try:

            def on_event(line: dict[str, Any]) -> None:
                if line["event"] != "ready":
                    return
                ready = time.monotonic()
                sleep_until(ready + size["settle"] - 0.5)
                scrapes["before"] = _scrape(server)
                sleep_until(ready + trickle_end + size["gap"] * 0.6)
                scrapes["after_trickle"] = _scrape(server)

            report = run_fleet(
                work,
                server.native_port,
                [
                    "--count",
                    str(n),
                    "--heartbeat",
                    "60",
                    "--source-count",
                    str(size["sources"]),
                    "--sos-rate",
                    str(rate),
                    "--sos-rate-at",
                    str(size["settle"]),
                    "--sos-count",
                    str(trickle),
                    "--sos-burst",
                    str(burst),
                    "--sos-at",
                    str(burst_at),
                    "--duration",
                    str(burst_at + 1.0),
                    "--drain",
                    str(size["drain"]),
                    "--ramp-timeout",
                    "600",
                ],
                on_event=on_event,
                timeout=1200,
            )
            # Wait (bounded) until every incident has had its notification.
            deadline = time.monotonic() + size["notify_wait"]
            before = scrapes.get("before", {}).get("notify", {}).get("count", 0.0)
            want = before + report["sos"]["pressed"]
            while True:
                scrapes["end"] = _scrape(server)
                if scrapes["end"]["notify"]["count"] >= want or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        finally:
            server.stop(60)
        counts = _db_counts(db)
    sos = report["sos"]
    phases = sos["phases"]
    tr = phases.get("trickle", {"pressed": 0, "acked": 0, "latency_ms": {}})
    bu = phases.get("burst", {"pressed": 0, "acked": 0, "latency_ms": {}})
    notify_trickle = notify_burst = ack_trickle = ack_burst = None
    if {"before", "after_trickle", "end"} <= scrapes.keys():
        b, m, e = scrapes["before"], scrapes["after_trickle"], scrapes["end"]
        notify_trickle = _hist_figures(histogram_delta(m["notify"], b["notify"]))
        notify_burst = _hist_figures(histogram_delta(e["notify"], m["notify"]))
        ack_trickle = _hist_figures(histogram_delta(m["ack"], b["ack"]))
        ack_burst = _hist_figures(histogram_delta(e["ack"], m["ack"]))
    pressed = sos["pressed"]
    lost = sos["unacked"]
    duplicated = counts["incidents"] - pressed
    figures = {
        "terminals": n,
        "logged_in": report["connects"]["logged_in"],
        "login_ramp_s": report["ramp_s"],
        "trickle": {"rate_per_s": rate, **tr},
        "burst": {"size": burst, **bu},
        "first_notification_trickle": notify_trickle,
        "first_notification_burst": notify_burst,
        "server_ack_latency_trickle": ack_trickle,
        "server_ack_latency_burst": ack_burst,
        "pressed": pressed,
        "acked": sos["acked"],
        "lost": lost,
        "resends": sos["resends"],
        "duplicate_acks": sos["duplicate_acks"],
        "db": counts,
        "duplicated_incidents": duplicated,
    }
    tp99 = tr["latency_ms"].get("p99")
    bp99 = bu["latency_ms"].get("p99")
    np99 = notify_trickle["p99_ms_est"] if notify_trickle else None
    targets = [
        target("SOS p99 trickle (ms)", tp99, "<= 20", None if tp99 is None else tp99 <= 20),
        target("SOS p99 burst (ms)", bp99, "<= 100", None if bp99 is None else bp99 <= 100),
        target(
            "first notification p99 trickle (ms, histogram estimate)",
            np99,
            "<= 100",
            None if np99 is None else np99 <= 100,
            "estimated from Prometheus buckets (0.01, 0.05, 0.1, 0.25 s ...)",
        ),
        target("SOS lost", lost, "0", lost == 0),
        target(
            "incidents = presses (none duplicated)",
            f"{counts['incidents']} / {pressed}",
            "equal",
            counts["incidents"] == pressed and counts["sos_frames"] == pressed,
        ),
    ]
    return {
        "figures": figures,
        "targets": targets,
        "notes": [
            "SOS latency is measured by the fleet: first send of the SOS frame -> its ACK "
            "read back; resends keep the first send time.",
            "First-notification figures come from the server's histogram: incident created "
            "(SOS handled by the gateway) -> notification handed to the channel.",
        ],
        "server": server.command,
        "fleet_command": report["command"],
        "seed": seed,
        "fleet": {k: v for k, v in report.items() if k not in ("sos", "options")},
        "sos": {k: v for k, v in sos.items() if k != "presses"},
        "scrapes": scrapes,
        "series": {
            "title": "SOS latency by press order",
            "x": "press #",
            "y": "ms (sent -> ACK)",
            "lines": {
                phase: [
                    (i, p["ack_ms"])
                    for i, p in enumerate(q for q in sos.get("presses", []) if q["phase"] == phase)
                    if p["ack_ms"] is not None
                ]
                for phase in ("trickle", "burst")
            },
        },
    }
