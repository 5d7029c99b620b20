"""Run one benchmark (or all) and write ``<out>/<name>.json``.

    python -m benchmarks throughput --size full [--out benchmarks/results] [--profile]
    python -m benchmarks all --size smoke

Besides the five benchmarks of this package (throughput, connections, sos_latency,
store_cost, timers), any module in ``benchmarks/`` that defines ``add_arguments`` and
``run`` is a benchmark too.

Benchmarks print their figures and write JSON (machine, exact command, figures,
targets met or missed); a PNG is drawn too when matplotlib is installed.  They never
assert on speed.  ``all`` runs each benchmark in its own process, one after another.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import NAMES, RESULTS, git_state, machine_info, raise_nofile

SKIP = {"baseline_server"}


def benchmark_names() -> list[str]:
    """The five of this package, then any other module here with ``run`` and ``add_arguments``."""
    import benchmarks

    names = list(NAMES)
    for info in pkgutil.iter_modules(benchmarks.__path__):
        if info.name in names or info.name.startswith("_") or info.name in SKIP:
            continue
        module = importlib.import_module(f"benchmarks.{info.name}")
        if hasattr(module, "run") and hasattr(module, "add_arguments"):
            names.append(info.name)
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="name", required=True)
    for name in (*benchmark_names(), "all"):
        p = sub.add_parser(name)
        p.add_argument("--size", choices=("smoke", "full"), default="smoke")
        p.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON")
        p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, DBs)")
        if name != "all":
            importlib.import_module(f"benchmarks.{name}").add_arguments(p)
    return parser


def _plot(name: str, result: dict[str, Any], out: Path) -> str | None:
    """Draw the benchmark's series if it has any and matplotlib is installed."""
    series = result.get("series")
    if not series:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, points in series.get("lines", {}).items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=label)
    ax.set_xlabel(series.get("x", ""))
    ax.set_ylabel(series.get("y", ""))
    ax.set_title(series.get("title", name))
    ax.legend()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def _print(name: str, doc: dict[str, Any]) -> None:
    print(f"== {name} ({doc['size']}) in {doc['duration_s']} s")
    print(json.dumps(doc["figures"], indent=1, ensure_ascii=False))
    for t in doc.get("targets", []):
        met = {True: "MET", False: "MISSED", None: "n/a"}[t["met"]]
        print(f"  [{met}] {t['target']}: {t['value']} (limit {t['limit']}) {t.get('note', '')}")
    for note in doc.get("notes", []):
        print(f"  note: {note}")


def run_one(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"benchmarks.{args.name}")
    nofile = raise_nofile()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    machine = machine_info()
    git = git_state()
    try:
        result = module.run(args)
        status = "ok"
    except Exception:
        result = {"figures": {}, "error": traceback.format_exc()}
        status = "error"
    doc: dict[str, Any] = {
        "name": args.name,
        "size": args.size,
        "status": status,
        "command": "python -m benchmarks " + " ".join(sys.argv[1:]),
        "machine": machine,
        "git": git,
        "git_after": git_state(),
        "nofile_raised_to": list(nofile),
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "duration_s": round(time.time() - started, 1),
        **result,
    }
    series = doc.pop("series", None)
    if series:
        doc["plot"] = _plot(args.name, {"series": series}, args.out)
        doc["series"] = series
    path = args.out / f"{args.name}.json"
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False, default=str) + "\n")
    _print(args.name, doc)
    print(f"wrote {path}")
    if status != "ok":
        print(result["error"], file=sys.stderr)
        return 1
    return 0


def run_all(args: argparse.Namespace) -> int:
    worst = 0
    for name in benchmark_names():
        cmd = [
            sys.executable,
            "-m",
            "benchmarks",
            name,
            "--size",
            args.size,
            "--out",
            str(args.out),
        ]
        worst = max(worst, subprocess.call(cmd))
    return worst


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_all(args) if args.name == "all" else run_one(args)


if __name__ == "__main__":
    sys.exit(main())
