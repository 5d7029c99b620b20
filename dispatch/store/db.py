"""Engines, schema migration and the bounded thread pools all SQL runs on.

The reactor thread never waits on the database: every call goes through
:meth:`Database.read`, :meth:`Database.write` or :meth:`Database.urgent`, which
run a function on a worker thread and return a Deferred.  SOS writes use their
own pool so a large heartbeat flush can never queue in front of them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorCore, IReactorThreads
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")

MIGRATIONS = Path(__file__).parent / "migrations"


def _sqlite_pragmas(immediate: bool, synchronous: str) -> Callable[[Engine], None]:
    def install(engine: Engine) -> None:
        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" hook below decide how transactions start.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # FULL: an acknowledged SOS must survive a power cut, not only a crash.  Live
            # state (NORMAL) may lose its last flushes to a power cut, never consistency:
            # the WAL is append-only and the next FULL commit syncs the frames before it.
            cur.execute(f"PRAGMA synchronous={synchronous}")
            # Writers queue on SQLite's one lock; under a burst (10,000 incidents escalating
            # while care rounds are planned) 10 s was seen to run out, so wait longer.
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            # Writers take the lock up front: a deferred transaction that reads and
            # then writes fails at once with "database is locked" instead of waiting.
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return install


class WriteGate:
    """One SQLite writer at a time in this process, alarms first.

    SQLite has one write lock.  Left to itself, a writer that finds it taken
    sleeps in the busy handler (1, 2, 5, 10, 15 ms ...) and polls, so an SOS
    arriving during a live-state flush chunk waited up to twice the chunk's
    time.  Queuing writers here instead hands the lock over the moment it is
    free, and an urgent writer (SOS) goes before every waiting ordinary one.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._urgent_waiting = 0
        self.waiting = 0

    def acquire(self, urgent: bool) -> None:
        """Block until this thread may write."""
        with self._cond:
            self.waiting += 1
            if urgent:
                self._urgent_waiting += 1
                try:
                    while self._busy:
                        self._cond.wait()
                finally:
                    self._urgent_waiting -= 1
            else:
                while self._busy or self._urgent_waiting:
                    self._cond.wait()
            self.waiting -= 1
            self._busy = True

    def release(self) -> None:
        """Let the next writer in (urgent ones first)."""
        with self._cond:
            self._busy = False
            self._cond.notify_all()


def make_engine(
    url: str, *, immediate: bool = False, pool_size: int = 5, synchronous: str = "FULL"
) -> Engine:
    """Create an engine; SQLite gets WAL, a busy timeout and explicit transaction starts.

    ``synchronous`` (SQLite only): FULL fsyncs every commit; NORMAL leaves it to the
    next FULL commit or checkpoint.
    """
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=pool_size
        )
        _sqlite_pragmas(immediate, synchronous)(engine)
        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=2, pool_pre_ping=True)


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema at ``url`` to ``revision`` with Alembic."""
    from alembic import command
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logging"] = False
    command.upgrade(cfg, revision)


class Database:
    """SQL access for the reactor: bounded pools, one function per transaction."""

    def __init__(
        self, url: str, reactor: Any, *, max_threads: int = 4, urgent_threads: int = 2
    ) -> None:
        self.url = url
        self.reactor = reactor
        self.dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
        self._read = sessionmaker(make_engine(url, pool_size=max_threads), expire_on_commit=False)
        write_engine = make_engine(url, immediate=True, pool_size=max_threads + urgent_threads)
        self._write = sessionmaker(write_engine, expire_on_commit=False)
        self.sql_dialect = write_engine.dialect
        # Writes that may be lost to a power cut (live state): no fsync of their own, so
        # an SOS queued behind a flush waits for the statements, not for the disk.
        self._relaxed = (
            sessionmaker(
                make_engine(url, immediate=True, pool_size=max_threads, synchronous="NORMAL"),
                expire_on_commit=False,
            )
            if self.dialect == "sqlite"
            else self._write
        )
        self._pool = ThreadPool(1, max_threads, name="dispatch-db")
        self._urgent_pool = ThreadPool(1, urgent_threads, name="dispatch-db-urgent")
        # PostgreSQL locks rows, not the database: its writers need no queue.
        self._gate = WriteGate() if self.dialect == "sqlite" else None
        self._started = False

    def start(self) -> None:
        """Start the worker threads and stop them when the reactor shuts down."""
        if self._started:
            return
        self._started = True
        self._pool.start()
        self._urgent_pool.start()
        if IReactorCore.providedBy(self.reactor):
            self.reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def stop(self) -> None:
        """Stop the pools (waits for running work) and close connections."""
        if not self._started:
            return
        self._started = False
        self._pool.stop()
        self._urgent_pool.stop()
        for factory in (self._read, self._write, self._relaxed):
            factory.kw["bind"].dispose()

    def session_sync(self, write: bool = True) -> Session:
        """A session for code already off the reactor thread (CLI, migrations, tests)."""
        return (self._write if write else self._read)()

    def _run(
        self,
        pool: ThreadPool,
        factory: sessionmaker,
        fn: Callable[..., T],
        *args: Any,
        gate: str = "",
        durable: bool = True,
    ):
        relaxed_pg = not durable and self.dialect == "postgresql"

        def transaction() -> T:
            with factory() as session, session.begin():
                if relaxed_pg:
                    # The same trade on PostgreSQL: the commit returns before the WAL flush.
                    session.execute(text("SET LOCAL synchronous_commit TO OFF"))
                return fn(session, *args)

        def work() -> T:
            if not gate or self._gate is None:
                return transaction()
            self._gate.acquire(gate == "urgent")
            try:
                return transaction()
            finally:
                self._gate.release()

        assert IReactorThreads.providedBy(self.reactor)
        return threads.deferToThreadPool(self.reactor, pool, work)

    def read(self, fn: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """Run ``fn(session, *args)`` in a read transaction on the worker pool."""
        return self._run(self._pool, self._read, fn, *args)

    def write(self, fn: Callable[..., T], *args: Any, durable: bool = True) -> defer.Deferred[T]:
        """Run ``fn(session, *args)`` in a write transaction on the worker pool.

        ``durable=False``: the commit does not wait for the disk (a power cut may lose
        it, a crash of the process does not); for live state only, never for alarms.
        """
        factory = self._write if durable else self._relaxed
        return self._run(self._pool, factory, fn, *args, gate="write", durable=durable)

    def urgent(self, fn: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """Like :meth:`write`, on the pool reserved for SOS and other alarms."""
        return self._run(self._urgent_pool, self._write, fn, *args, gate="urgent")
