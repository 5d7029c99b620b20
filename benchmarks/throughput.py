"""Heartbeat throughput: the bare-reactor baseline vs ``dispatch serve``, same stream.

1,000 connections (smoke: 100) each keep one heartbeat in flight (the next goes as
soon as the ACK is back), then 8 in flight (pipelined).  Both servers run at once,
pinned to CPU 0 (only the one under load is busy); the fleet is pinned to CPU 1.
Rounds alternate baseline / dispatch so drift from other work on the machine hits
both; the figure is the median over rounds and the ratio is dispatch / baseline.

``--profile`` then runs dispatch once more under cProfile on the one-in-flight load
and writes ``throughput.prof.txt`` (top functions by cumulative and by own time).
"""

from __future__ import annotations

import argparse
import io
import pstats
import shutil
import sysconfig
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks import (
    ROOT,
    BaselineServer,
    DispatchServer,
    Meter,
    median,
    run_fleet,
    seeded_sqlite,
    target,
    workspace,
)

SIZES = {
    "smoke": {"connections": 100, "warmup": 0.3, "measure": 1.0, "rounds": 1, "pipelined": 8},
    "full": {"connections": 1000, "warmup": 3.0, "measure": 15.0, "rounds": 3, "pipelined": 8},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile dispatch: cProfile, and py-spy when installed",
    )
    p.add_argument("--rounds", type=int, default=None, help="override the rounds of the size")


def _measure(
    workdir: Path, server: Any, label: str, conns: int, inflight: int, warmup: float, span: float
) -> dict[str, Any]:
    meter: dict[str, Any] = {}

    def on_event(line: dict[str, Any]) -> None:
        if line["event"] == "window_start":
            meter["m"] = Meter({"server": server.pid})
        elif line["event"] == "window_end" and "m" in meter:
            meter["r"] = meter["m"].read()

    report = run_fleet(
        workdir,
        server.native_port,
        [
            "--count",
            str(conns),
            "--pipelined",
            str(inflight),
            "--warmup",
            str(warmup),
            "--duration",
            str(warmup + span),
            "--drain",
            "0",
            "--no-presses",
        ],
        name=f"fleet-{label}-{inflight}",
        on_event=on_event,
    )
    window = report["window"]
    read = meter.get("r", {})
    server_share = read.get("cpu_share", {}).get("server")
    fleet_share = window.get("fleet_cpu_share")
    other = None
    if read and server_share is not None and fleet_share is not None:
        other = round(max(0.0, read["machine_busy_cores"] - server_share - fleet_share), 3)
    return {
        "frames_per_s": window.get("frames_per_s"),
        "window_s": window.get("seconds"),
        "fleet_cpu_share": fleet_share,
        "server_cpu_share": server_share,
        "per_cpu": read.get("per_cpu"),
        "other_busy_cores": other,
        "logged_in": report["connects"]["logged_in"],
        "lost": report["connects"]["lost"],
        "nacks": report["nacks"],
        "fleet_command": report["command"],
    }


def _cprofile(workdir: Path, db_url: str, out: Path, conns: int, warmup: float, span: float):
    prof = workdir / "dispatch.prof"
    server = DispatchServer(workdir, db_url, profile=prof, name="dispatch-cprofile")
    try:
        m = _measure(workdir, server, "cprofile", conns, 1, warmup, span)
    finally:
        server.stop(60)
    if not prof.exists():
        return {"error": "no profile written", "log": server.log_tail()}
    stats = pstats.Stats(str(prof))
    text = io.StringIO()
    text.write(
        f"cProfile of `{server.command}`\n"
        f"under {conns} connections x 1 heartbeat in flight for {span:g}s "
        f"(after {warmup:g}s warm-up; start-up, logins and shutdown included).\n"
        f"Frames/s while profiled: {m['frames_per_s']} (cProfile slows the server down, "
        f"and charges its overhead to small functions; compare with py-spy).\n\n"
    )
    for key, title in (("cumulative", "cumulative time"), ("tottime", "own (total) time")):
        text.write(f"===== top 45 by {title} =====\n")
        stats.stream = text
        stats.sort_stats(key).print_stats(45)
    path = out / "throughput.prof.txt"
    body = text.getvalue().replace(str(ROOT) + "/", "")
    for lib in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["stdlib"]}:
        body = body.replace(lib + "/", "")
    path.write_text(body)
    (out / "throughput.prof").write_bytes(prof.read_bytes())
    return {"text": str(path), "frames_per_s_profiled": m["frames_per_s"]}


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)`` for aggregation."""
    if " (" not in frame:
        return frame
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3.11/", str(ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})"


def summarize_collapsed(raw: str, top: int = 40) -> str:
    """Top functions by own and by inclusive samples from py-spy's collapsed stacks.

    Stacks recorded with ``--threads`` start with ``thread (tid): name``; samples are
    split into the reactor (main) thread and the database pool threads.
    """
    names: dict[str, str] = {}
    stacks: list[tuple[str, list[str], int]] = []
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        tid = ""
        if frames[0].startswith("thread ("):
            root = frames.pop(0)
            tid, _, name = root.partition(": ")
            if name:
                names[tid] = name
        stacks.append((tid, [_frame_name(f) for f in frames], int(count)))
    groups: Counter = Counter()
    tables: dict[str, tuple[Counter, Counter]] = {"all threads": (Counter(), Counter())}
    tables["reactor thread"] = (Counter(), Counter())
    total = 0
    for tid, frames, n in stacks:
        name = names.get(tid, "MainThread")
        group = "reactor thread" if name == "MainThread" else "database pool threads"
        if "PoolThread" not in name and name != "MainThread":
            group = f"other ({name})"
        groups[group] += n
        total += n
        for key in ("all threads", "reactor thread"):
            if key == "reactor thread" and group != "reactor thread":
                continue
            own, incl = tables[key]
            if frames:
                own[frames[-1]] += n
            for f in set(frames):
                incl[f] += n
    out = io.StringIO()
    out.write(f"===== samples holding the GIL, by thread (of {total}) =====\n")
    for group, n in groups.most_common():
        out.write(f"{100 * n / total:6.1f}%  {n:7d}  {group}\n")
    out.write("\n")
    for key, (own, incl) in tables.items():
        for title, counter in (("own", own), ("inclusive", incl)):
            out.write(f"===== {key}: top {top} by {title} samples (% of all {total}) =====\n")
            for name, n in counter.most_common(top):
                out.write(f"{100 * n / total:6.1f}%  {n:7d}  {name}\n")
            out.write("\n")
    return out.getvalue()


def _thread_names(raw: str) -> dict[str, str]:
    names = {}
    for line in raw.splitlines():
        root = line.split(";", 1)[0]
        if root.startswith("thread (") and ": " in root:
            tid, _, name = root.partition(": ")
            names[tid] = name.rsplit(" ", 1)[0] if name.endswith(tuple("0123456789")) else name
    return names


def normalize_collapsed(raw: str, keep: float = 0.95) -> str:
    """Collapsed stacks without line numbers (merged), for flamegraph.pl or speedscope.

    Only the most frequent stacks covering ``keep`` of the samples are kept (the long
    tail of one-sample stacks would triple the file and show nothing).
    """
    names = _thread_names(raw)
    merged: Counter = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        head = []
        if frames[0].startswith("thread ("):
            tid = frames.pop(0).partition(": ")[0]
            name = names.get(tid, "MainThread")
            head = ["reactor" if name == "MainThread" else "db-pool" if "Pool" in name else name]
        merged[";".join(head + [_frame_name(f) for f in frames])] += int(count)
    total = sum(merged.values())
    lines, covered = [], 0
    for stack, n in merged.most_common():
        if covered >= keep * total:
            break
        lines.append(f"{stack} {n}\n")
        covered += n
    return "".join(lines)


def _pyspy(workdir: Path, db_url: str, out: Path, conns: int, warmup: float, span: float):
    exe = shutil.which("py-spy")
    if exe is None:
        return {"skipped": "py-spy not installed (pip install py-spy)"}
    raw = workdir / "pyspy.raw"
    wrapper = [exe, "record", "--format", "raw", "--rate", "250", "--nonblocking"]
    wrapper += ["--gil", "--threads", "-o", str(raw), "--"]
    server = DispatchServer(workdir, db_url, wrapper=wrapper, name="dispatch-pyspy")
    try:
        m = _measure(workdir, server, "pyspy", conns, 1, warmup, span)
    finally:
        server.stop(60)
    if not raw.exists():
        return {"error": "py-spy wrote nothing", "log": server.log_tail()}
    collapsed = raw.read_text()
    head = (
        f"py-spy (250 Hz, non-blocking, --gil: only samples holding the GIL, i.e. Python "
        f"work) of `{server.command}`\n"
        f"under {conns} connections x 1 heartbeat in flight, {span:g}s window; whole run "
        f"sampled (start-up and logins are a small share).  Frames/s while sampled: "
        f"{m['frames_per_s']}.  Flame input: throughput.collapsed.txt (the stacks covering "
        f"95% of samples; flamegraph.pl or speedscope.app draw it).\n\n"
    )
    (out / "throughput.pyspy.txt").write_text(head + summarize_collapsed(collapsed))
    (out / "throughput.collapsed.txt").write_text(normalize_collapsed(collapsed))
    return {"text": str(out / "throughput.pyspy.txt"), "frames_per_s_sampled": m["frames_per_s"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    size = dict(SIZES[args.size])
    if args.rounds:
        size["rounds"] = args.rounds
    conns, warmup, span = size["connections"], size["warmup"], size["measure"]
    k = size["pipelined"]
    runs: dict[str, list[dict[str, Any]]] = {}
    with workspace(args.keep) as work:
        db = work / "dispatch.db"
        seed = seeded_sqlite(db, conns)
        db_url = f"sqlite:///{db}"
        baseline = BaselineServer(work)
        dispatch = DispatchServer(work, db_url)
        commands = {"baseline": baseline.command, "dispatch": dispatch.command}
        try:
            for _round in range(size["rounds"]):
                for inflight in (1, k):
                    for label, server in (("baseline", baseline), ("dispatch", dispatch)):
                        key = f"{label}_{inflight}"
                        m = _measure(work, server, label, conns, inflight, warmup, span)
                        runs.setdefault(key, []).append(m)
                        print(f"{key}: {m['frames_per_s']} frames/s", flush=True)
        finally:
            baseline.stop()
            dispatch.stop()
        profile = None
        if args.profile:
            profile = {
                "cprofile": _cprofile(work, db_url, args.out, conns, warmup, span),
                "pyspy": _pyspy(work, db_url, args.out, conns, warmup, span),
            }
    fps = {key: median([r["frames_per_s"] for r in rs]) for key, rs in runs.items()}
    ratio_1 = fps["dispatch_1"] / fps["baseline_1"] if fps["baseline_1"] else None
    ratio_k = fps[f"dispatch_{k}"] / fps[f"baseline_{k}"] if fps[f"baseline_{k}"] else None
    rounds_ratio = [
        round(d["frames_per_s"] / b["frames_per_s"], 3)
        for d, b in zip(runs["dispatch_1"], runs["baseline_1"], strict=True)
        if b["frames_per_s"]
    ]
    figures = {
        "connections": conns,
        "window_s": span,
        "rounds": size["rounds"],
        "baseline_frames_per_s": fps["baseline_1"],
        "dispatch_frames_per_s": fps["dispatch_1"],
        "ratio": round(ratio_1, 3) if ratio_1 else None,
        "ratio_per_round": rounds_ratio,
        "pipelined": k,
        "baseline_pipelined_frames_per_s": fps[f"baseline_{k}"],
        "dispatch_pipelined_frames_per_s": fps[f"dispatch_{k}"],
        "pipelined_ratio": round(ratio_k, 3) if ratio_k else None,
        "server_cpu_share": {
            key: median([r["server_cpu_share"] for r in rs]) for key, rs in runs.items()
        },
        "fleet_cpu_share": {
            key: median([r["fleet_cpu_share"] for r in rs]) for key, rs in runs.items()
        },
        "other_busy_cores": max((r["other_busy_cores"] or 0) for rs in runs.values() for r in rs),
        "server_cpu0_busy": {
            key: median([(r["per_cpu"] or {}).get("cpu0", {}).get("busy") for r in rs])
            for key, rs in runs.items()
        },
        "server_cpu0_irq": {
            key: median([(r["per_cpu"] or {}).get("cpu0", {}).get("irq") for r in rs])
            for key, rs in runs.items()
        },
    }
    notes = [
        "Server pinned to CPU 0, fleet to CPU 1 (os.sched_setaffinity); one round = "
        "baseline and dispatch back to back on the same stream; figures are medians.",
        "If fleet_cpu_share is near 1.0 the load generator, not the server, was the limit. "
        "server_cpu0_busy is the whole of CPU 0 (server process + kernel irq/softirq work "
        "for loopback TCP, which is not charged to any process); near 1.0 means the "
        "server's core was saturated.",
    ]
    if figures["other_busy_cores"] and figures["other_busy_cores"] > 0.2:
        notes.append(
            f"CPU not charged to server or fleet (kernel networking, other processes) reached "
            f"{figures['other_busy_cores']} cores in a window."
        )
    return {
        "figures": figures,
        "targets": [
            target(
                "dispatch/baseline ratio (1 in flight)",
                figures["ratio"],
                ">= 0.5",
                None if ratio_1 is None else ratio_1 >= 0.5,
            ),
        ],
        "notes": notes,
        "servers": commands,
        "seed": seed,
        "runs": runs,
        "profile": profile,
        "series": {
            "title": "Heartbeat frames/s per round",
            "x": "round",
            "y": "frames/s",
            "lines": {
                key: [(i + 1, r["frames_per_s"]) for i, r in enumerate(rs)]
                for key, rs in runs.items()
            },
        },
    }
