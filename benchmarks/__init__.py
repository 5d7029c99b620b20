"""Benchmarks of the dispatch server: ``python -m benchmarks <name> [--size smoke|full]``.

Each benchmark module has ``add_arguments(parser)`` and ``run(args) -> dict`` returning
``{"figures": ..., "targets": [...], "notes": [...]}``; the runner adds the machine,
the command and the timing and writes ``<out>/<name>.json``.  This package also holds
what the benchmarks share: machine facts, /proc readings, CPU pinning, a cached seeded
database, and the server and fleet subprocesses.

Everything here targets loopback only and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
NAMES = ("throughput", "connections", "sos_latency", "store_cost", "timers", "care_day")
IDENT_PREFIX = "86"
SEED_VERSION = "1"
SERVER_CPU = 0
LOAD_CPU = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")

# One family and one community contact per subscriber, like a real enrollment.
FAMILY_PHONE = "1390{:07d}"
COMMUNITY_PHONE = "1380{:07d}"

# --- machine and process facts ---------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, memory, Python, platform, date, load."""
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = None
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    versions = {}
    for mod in ("twisted", "sqlalchemy", "construct", "psycopg"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    return {
        "cpu_model": model,
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "mem_total_mib": mem_kib // 1024 if mem_kib else None,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        "versions": versions,
    }


def raise_nofile() -> tuple[int, int]:
    """Raise this process's open-files soft limit to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    """Resident set size (VmRSS) in KiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    """How many files a process holds open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def system_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    cpus = per_cpu()
    return cpus["cpu"]["busy"], cpus["cpu"]["total"]


def per_cpu() -> dict[str, dict[str, float]]:
    """Seconds since boot per CPU line of /proc/stat: tasks, irq (hard+soft), idle, steal."""
    out = {}
    with open("/proc/stat") as fh:
        for line in fh:
            if not line.startswith("cpu"):
                break
            name, *vals = line.split()
            v = [int(x) / CLK_TCK for x in vals[:8]] + [0.0] * (8 - len(vals[:8]))
            user, nice, system, idle, iowait, irq, softirq, steal = v
            out[name] = {
                "tasks": user + nice + system,
                "irq": irq + softirq,
                "idle": idle + iowait,
                "steal": steal,
                "busy": user + nice + system + irq + softirq + steal,
                "total": sum(v),
            }
    return out


def pin(pid: int, cpu: int) -> None:
    """Pin every thread of ``pid`` to one CPU (threads started later inherit it)."""
    if cpu >= (os.cpu_count() or 1):
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), {cpu})


class Meter:
    """CPU and wall time of some processes (and of each CPU) between two reads."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.t0 = time.monotonic()
        self.cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        self.stat0 = per_cpu()

    def read(self) -> dict[str, Any]:
        """CPU share of each process; busy share of each CPU split into tasks and irq."""
        span = time.monotonic() - self.t0
        shares = {
            name: round((cpu_seconds(pid) - self.cpu0[name]) / span, 3)
            for name, pid in self.pids.items()
        }
        stat1 = per_cpu()
        cpus = {}
        for name, now in stat1.items():
            was = self.stat0.get(name)
            if was is None or name == "cpu":
                continue
            cpus[name] = {
                k: round((now[k] - was[k]) / span, 3) for k in ("tasks", "irq", "steal", "busy")
            }
        machine = (stat1["cpu"]["busy"] - self.stat0["cpu"]["busy"]) / span
        return {
            "seconds": round(span, 3),
            "cpu_share": shares,
            "per_cpu": cpus,
            "machine_busy_cores": round(machine, 3),
            "not_these_processes_cores": round(max(0.0, machine - sum(shares.values())), 3),
        }


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 right now (the native server uses both)."""
    for _ in range(50):
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.1) -> Any:
    """Poll ``predicate`` until truthy; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(step)


def sleep_until(t: float) -> None:
    """Sleep until monotonic time ``t`` (no-op if past)."""
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def percentiles(values: list[float]) -> dict[str, Any]:
    from simulators.fleet import percentiles as pct

    return pct(values)


def median(values: list[float]) -> float | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def target(name: str, value: Any, limit: Any, met: bool | None, note: str = "") -> dict[str, Any]:
    """One line of the targets table."""
    return {"target": name, "value": value, "limit": limit, "met": met, "note": note}


# --- seeded databases ------------------------------------------------------------------


def ident(index: int) -> str:
    from simulators.fleet import make_ident

    return make_ident(IDENT_PREFIX, index)


def subscriber_data(index: int) -> dict[str, Any]:
    """The enrollment of subscriber ``index`` (device ident = fleet ident ``index``)."""
    return {
        "name": f"bench-{index}",
        "district": "鹿城区",
        "address": f"五马街{index}号",
        "living_situation": "alone",
        "contacts": [
            {"name": f"family-{index}", "phone": FAMILY_PHONE.format(index), "relation": "son"},
            {
                "name": f"community-{index}",
                "phone": COMMUNITY_PHONE.format(index),
                "relation": "worker",
                "tier": "community",
            },
        ],
        "device": {"protocol": "native", "ident": ident(index)},
    }


def seed(url: str, count: int, start: int = 0, batch: int = 1000) -> float:
    """Migrate ``url`` and enroll subscribers ``start``..``count-1``; returns seconds taken."""
    from sqlalchemy.orm import Session

    from dispatch.store import db as dbmod
    from dispatch.store.subscribers import create_subscriber

    t0 = time.monotonic()
    dbmod.upgrade(url)
    engine = dbmod.make_engine(url)
    now = datetime.now(UTC)
    try:
        with Session(engine) as session:
            for lo in range(start, count, batch):
                with session.begin():
                    for i in range(lo, min(count, lo + batch)):
                        create_subscriber(session, subscriber_data(i), now)
                session.expunge_all()
        if url.startswith("sqlite"):
            with engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        engine.dispose()
    return time.monotonic() - t0


def _seed_key() -> str:
    h = hashlib.sha1(SEED_VERSION.encode())
    store = ROOT / "dispatch" / "store"
    for path in sorted((store / "migrations" / "versions").glob("*.py")):
        h.update(path.read_bytes())
    for name in ("models.py", "subscribers.py"):
        h.update((store / name).read_bytes())
    return h.hexdigest()[:12]


def seed_cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / "dispatch-bench-seed"


def seeded_sqlite(dest: Path, count: int) -> dict[str, Any]:
    """A SQLite database at ``dest`` with at least ``count`` enrolled terminals.

    Enrolling goes through ``create_subscriber`` (about 2 ms each here), so the
    result is cached per schema version under the temp directory and copied.
    """
    cache = seed_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    key = _seed_key()
    found = sorted(
        (int(p.stem.split("-")[-1]), p)
        for p in cache.glob(f"seed-{key}-*.db")
        if int(p.stem.split("-")[-1]) >= count
    )
    took = 0.0
    if found:
        have, template = found[0]
    else:
        have, template = count, cache / f"seed-{key}-{count}.db"
        tmp = template.with_suffix(f".tmp{os.getpid()}")
        took = seed(f"sqlite:///{tmp}", count)
        os.replace(tmp, template)
    shutil.copyfile(template, dest)
    return {"template": str(template), "enrolled": have, "seed_s": round(took, 2)}


def save_policy(url: str, document: dict[str, Any], name: str = "alarm") -> None:
    """Store ``document`` as the active global policy ``name`` (before the server starts)."""
    from sqlalchemy.orm import Session

    from dispatch.store import db as dbmod
    from dispatch.store.escalation import save_policy as save

    engine = dbmod.make_engine(url, immediate=True)
    try:
        with Session(engine) as session, session.begin():
            save(session, name, "global", None, None, document, "benchmark", datetime.now(UTC))
    finally:
        engine.dispose()


def pg_schema_url(url: str, schema: str) -> str:
    """``url`` with the search_path set to ``schema`` (what the app and Alembic then use)."""
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


def reset_pg(url: str, schema: str) -> None:
    """Drop and recreate ``schema`` (never ``public``: the database is shared)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
            conn.execute(text(f"CREATE SCHEMA {schema}"))
    finally:
        engine.dispose()


def drop_pg_schema(url: str, schema: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
    finally:
        engine.dispose()


def git_state() -> dict[str, Any]:
    """The commit measured, and whether the server code differed from it."""

    def git(*args: str) -> str:
        try:
            out = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return out.stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "subject": git("log", "-1", "--format=%s"),
        "dispatch_dirty": bool(git("status", "--porcelain", "--", "dispatch")),
    }


def pg_problem(url: str) -> str | None:
    """Why PostgreSQL at ``url`` cannot be used, or None."""
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:300]
    return None


# --- subprocesses ----------------------------------------------------------------------


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class Child:
    """A subprocess we started: pinned, logged to a file, always stopped by its pid."""

    def __init__(self, name: str, argv: list[str], workdir: Path, cpu: int | None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=workdir,
            env=child_env(),
        )
        self.pid = self.proc.pid
        if cpu is not None:
            pin(self.pid, cpu)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait, SIGKILL if it will not go (only this pid)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()
        return self.proc.returncode


class DispatchServer(Child):
    """``python -m dispatch serve`` on loopback, native port chosen here, others off.

    ``profile`` runs it under cProfile; ``wrapper`` (e.g. ``py-spy record ... --``) runs
    it under another program, in which case ``pid`` is the Python child's.
    """

    def __init__(
        self,
        workdir: Path,
        db_url: str,
        *,
        cpu: int | None = SERVER_CPU,
        http: bool = False,
        profile: Path | None = None,
        wrapper: list[str] | None = None,
        extra: list[str] | None = None,
        name: str = "dispatch",
    ) -> None:
        self.native_port = free_port()
        self.http_port = free_port() if http else 0
        prefix = ["-m", "cProfile", "-o", str(profile)] if profile else []
        argv = [
            sys.executable,
            *prefix,
            "-m",
            "dispatch",
            "serve",
            "--db",
            db_url,
            "--host",
            "127.0.0.1",
            "--native-port",
            str(self.native_port),
            "--http-port",
            str(self.http_port),
            "--gt06-port",
            "0",
            "--jt808-port",
            "0",
            "--log-format",
            "json",
            *(extra or []),
        ]
        self.command = " ".join(argv[1:])
        super().__init__(name, [*(wrapper or []), *argv], workdir, None if wrapper else cpu)
        self.wrapped = bool(wrapper)
        try:
            if wrapper:
                self.pid = wait_until(self._python_child, 30, "the wrapped server to start")
                if cpu is not None:
                    pin(self.proc.pid, LOAD_CPU)
                    pin(self.pid, cpu)
            wait_until(self._serving, 90, "dispatch serve to listen", 0.05)
        except Exception:
            self.stop(5)
            raise

    def _python_child(self) -> int | None:
        try:
            for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
                with open(f"/proc/{self.proc.pid}/task/{tid}/children") as fh:
                    kids = fh.read().split()
                if kids:
                    return int(kids[0])
        except OSError:
            return None
        return None

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stop the server; a wrapper is left to finish (and write its output) by itself."""
        if self.wrapped and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        return super().stop(timeout)

    def _serving(self) -> bool:
        if not self.alive():
            raise RuntimeError(f"dispatch serve exited: {self.log_tail()}")
        return b'"serving"' in self.log_path.read_bytes()[-200_000:]

    def metrics(self) -> str:
        """The Prometheus text from /metrics (needs ``http=True``)."""
        from urllib.request import urlopen

        with urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=10) as resp:
            return resp.read().decode()


class BaselineServer(Child):
    """``python -m benchmarks.baseline_server`` on an OS-chosen loopback port."""

    def __init__(self, workdir: Path, *, cpu: int | None = SERVER_CPU) -> None:
        argv = [sys.executable, "-m", "benchmarks.baseline_server", "--port", "0"]
        super().__init__("baseline", argv, workdir, cpu)
        self.command = " ".join(argv[1:])
        line = self._first_line(30)
        self.native_port = int(json.loads(line)["port"])

    def _first_line(self, timeout: float) -> bytes:
        box: list[bytes] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()))
        reader.daemon = True
        reader.start()
        reader.join(timeout)
        if not box or not box[0]:
            self.stop(5)
            raise RuntimeError(f"baseline server did not start: {self.log_tail()}")
        return box[0]


def run_fleet(
    workdir: Path,
    port: int,
    args: list[str],
    *,
    name: str = "fleet",
    cpu: int | None = LOAD_CPU,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    timeout: float = 900.0,
) -> dict[str, Any]:
    """Run ``python -m simulators.fleet`` to completion; returns its JSON report.

    ``on_event`` sees each JSON line (ready, window_start, ...) as it is printed, so
    the caller can read the server at the right moments.
    """
    out = workdir / f"{name}.json"
    argv = [
        sys.executable,
        "-m",
        "simulators.fleet",
        "--server",
        f"127.0.0.1:{port}",
        "--json",
        str(out),
        *(["--cpu", str(cpu)] if cpu is not None and cpu < (os.cpu_count() or 1) else []),
        *args,
    ]
    child = Child(name, argv, workdir, None)
    killer = threading.Timer(timeout, child.proc.kill)
    killer.daemon = True
    killer.start()
    try:
        assert child.proc.stdout is not None
        for raw in child.proc.stdout:
            if raw.startswith(b"{") and on_event is not None:
                on_event(json.loads(raw))
        child.proc.wait(timeout)
    finally:
        killer.cancel()
        code = child.stop(10)
    if not out.exists():
        raise RuntimeError(f"fleet wrote no report (exit {code}): {child.log_tail()}")
    report = json.loads(out.read_text())
    report["exit_code"] = code
    report["command"] = "python " + " ".join(argv[1:])
    return report


@contextlib.contextmanager
def workspace(keep: bool = False) -> Iterator[Path]:
    """A temporary directory for databases, logs and fleet reports."""
    path = Path(tempfile.mkdtemp(prefix="dispatch-bench-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


# --- Prometheus text -------------------------------------------------------------------


def histogram(text: str, name: str, labels: str = "") -> dict[str, Any]:
    """Cumulative buckets, count and sum of one histogram in /metrics text.

    ``labels``: the series' labels as exposed before ``le``, e.g. ``generation="2"``.
    """
    bucket = f"{name}_bucket{{{labels}," if labels else f"{name}_bucket{{"
    count_p, sum_p = (
        (f"{name}_count{{{labels}}} ", f"{name}_sum{{{labels}}} ")
        if labels
        else (f"{name}_count ", f"{name}_sum ")
    )
    buckets: dict[float, float] = {}
    count = total = 0.0
    for line in text.splitlines():
        if line.startswith(bucket):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float("inf") if le == "+Inf" else float(le)] = float(line.split()[-1])
        elif line.startswith(count_p):
            count = float(line.split()[-1])
        elif line.startswith(sum_p):
            total = float(line.split()[-1])
    return {"buckets": dict(sorted(buckets.items())), "count": count, "sum": total}


def histogram_delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    return {
        "buckets": {le: n - before["buckets"].get(le, 0.0) for le, n in after["buckets"].items()},
        "count": after["count"] - before["count"],
        "sum": after["sum"] - before["sum"],
    }


def histogram_quantile(h: dict[str, Any], q: float) -> float | None:
    """Prometheus-style quantile estimate (linear within the bucket), in seconds.

    A rank in the +Inf bucket returns the largest finite bound (a lower bound).
    """
    count = h["count"]
    if count <= 0:
        return None
    rank = q * count
    prev_le, prev_n = 0.0, 0.0
    for le, n in h["buckets"].items():
        if n >= rank:
            if le == float("inf"):
                return prev_le
            if n == prev_n:
                return le
            return prev_le + (le - prev_le) * (rank - prev_n) / (n - prev_n)
        prev_le, prev_n = le, n
    return prev_le


def fraction_within(h: dict[str, Any], le: float) -> float | None:
    if h["count"] <= 0:
        return None
    return h["buckets"].get(le, 0.0) / h["count"]
