"""Every benchmark's smoke size runs and writes its JSON, so none of them rots.

Only that: exit status 0 and the expected keys.  Never the figures: speed on a
shared 2-core machine is a measurement (docs/performance.md), not a test.  The
PostgreSQL part of ``store_cost`` runs when PostgreSQL answers (in a schema of its
own, dropped afterwards, like the store tests); under CI=true it must.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import pg_problem

ROOT = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("DISPATCH_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1/test")

TOP_KEYS = {"name", "size", "status", "command", "machine", "figures", "targets", "notes"}
MACHINE_KEYS = {"cpu_model", "nproc", "python", "platform", "date"}
FIGURES = {
    "throughput": {
        "baseline_frames_per_s",
        "dispatch_frames_per_s",
        "ratio",
        "baseline_pipelined_frames_per_s",
        "dispatch_pipelined_frames_per_s",
        "pipelined_ratio",
    },
    "connections": {
        "dispatch_kib_per_connection",
        "baseline_kib_per_connection",
        "memory_ratio",
        "dispatch_cpu_share",
        "baseline_cpu_share",
    },
    "sos_latency": {
        "trickle",
        "burst",
        "first_notification_trickle",
        "lost",
        "duplicated_incidents",
        "db",
    },
    "store_cost": {"sqlite"},
    "timers": {"timer_lateness_ms", "notification_lateness_ms", "exactly_once"},
    "care_day": {"cpu_s", "max_rss_mib", "max_prompts_in_one_second", "rounds_by_status"},
}


def _run(name: str, out: Path, *extra: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", name, "--size", "smoke", "--out", str(out), *extra],
        cwd=ROOT,
        capture_output=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-4000:]
    path = out / f"{name}.json"
    assert path.exists(), proc.stdout.decode(errors="replace")[-2000:]
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_smoke_size_runs_and_writes_json(name: str, tmp_path: Path) -> None:
    extra: list[str] = []
    if name == "store_cost":
        problem = pg_problem(PG_URL)
        if problem is None:
            extra = ["--pg", "--pg-url", PG_URL]
        elif os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the PostgreSQL part of store_cost: {problem}")
    doc = _run(name, tmp_path, *extra)
    assert doc.keys() >= TOP_KEYS
    assert doc["name"] == name and doc["size"] == "smoke" and doc["status"] == "ok"
    assert doc["machine"].keys() >= MACHINE_KEYS
    assert doc["command"].startswith("python -m benchmarks " + name)
    assert FIGURES[name] <= doc["figures"].keys(), doc["figures"]
    if extra:
        assert "postgresql" in doc["figures"]
