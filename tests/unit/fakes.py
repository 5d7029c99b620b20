"""Test doubles for unit tests: a synchronous database and seeding helpers.

:class:`SyncDatabase` has the interface of :class:`dispatch.store.db.Database`
but runs each function at once, on the calling thread, in its own transaction on
a real (migrated) SQLite file, and hands back an already-fired Deferred.  Code
under test therefore sees real SQL and real commits without threads or a reactor.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker
from twisted.internet import defer
from twisted.python.failure import Failure

from dispatch.store import db as dbmod
from dispatch.store import subscribers as subscriber_repo
from dispatch.store.models import Device

T = TypeVar("T")

DISTRICT = "鹿城区"


class InjectedStorageError(Exception):
    """The failure a SyncDatabase raises when told to fail its next call of a kind."""


class SyncDatabase:
    """``Database`` look-alike: synchronous, transactional, with injectable failures.

    ``fail_next`` holds call kinds (``"read"``, ``"write"``, ``"urgent"``); the next
    call of a listed kind fails with :class:`InjectedStorageError` (and the kind is
    removed, so the call after it succeeds).  ``calls`` records ``(kind, fn name)``
    of every call, failed ones included.
    """

    def __init__(self, url: str) -> None:
        dbmod.upgrade(url)
        self.url = url
        self.dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
        self._engines: list[Engine] = [
            dbmod.make_engine(url),
            dbmod.make_engine(url, immediate=True),
        ]
        self._read = sessionmaker(self._engines[0], expire_on_commit=False)
        self._write = sessionmaker(self._engines[1], expire_on_commit=False)
        self.sql_dialect = self._engines[1].dialect
        self.fail_next: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.relaxed: list[str] = []  # functions written with durable=False
        self.started = False

    def start(self) -> None:
        """Nothing to start; recorded for tests that check the lifecycle."""
        self.started = True

    def stop(self) -> None:
        """Close every connection."""
        self.started = False
        for engine in self._engines:
            engine.dispose()

    def session_sync(self, write: bool = True) -> Session:
        """A plain session (use ``with db.session_sync() as s, s.begin():``)."""
        return (self._write if write else self._read)()

    def _run(
        self, kind: str, factory: sessionmaker, fn: Callable[..., T], *args: Any
    ) -> defer.Deferred[T]:
        self.calls.append((kind, getattr(fn, "__name__", repr(fn))))
        try:
            if kind in self.fail_next:
                self.fail_next.discard(kind)
                raise InjectedStorageError(f"injected {kind} failure")
            with factory() as session, session.begin():
                result = fn(session, *args)
        except Exception:
            return defer.fail(Failure())
        return defer.succeed(result)

    def read(self, fn: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """Run ``fn(session, *args)`` in a read transaction, now."""
        return self._run("read", self._read, fn, *args)

    def write(self, fn: Callable[..., T], *args: Any, durable: bool = True) -> defer.Deferred[T]:
        """Run ``fn(session, *args)`` in a write transaction, now (``durable`` is noted)."""
        if not durable:
            self.relaxed.append(getattr(fn, "__name__", repr(fn)))
        return self._run("write", self._write, fn, *args)

    def urgent(self, fn: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """Like :meth:`write` (the urgent pool is only a scheduling difference)."""
        return self._run("urgent", self._write, fn, *args)

    def count_calls(self, kind: str | None = None, fn_name: str | None = None) -> int:
        """How many calls matched ``kind`` and/or the function's name."""
        return sum(
            1
            for k, name in self.calls
            if (kind is None or k == kind) and (fn_name is None or name == fn_name)
        )

    def query(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn(session)`` directly, for assertions on what is stored."""
        with self.session_sync(write=False) as session, session.begin():
            return fn(session)

    def count(self, model: Any, *where: Any) -> int:
        """Rows of ``model`` matching ``where``."""
        return self.query(
            lambda s: s.scalar(select(func.count()).select_from(model).where(*where)) or 0
        )


def subscriber_body(
    ident: str,
    *,
    protocol: str = "native",
    phones: tuple[str, ...] = ("+8613800000001", "+8613800000002"),
    name: str = "Wang Fang",
    district: str = DISTRICT,
) -> dict[str, Any]:
    """A subscriber body as the API would accept it, bound to device ``ident``."""
    return {
        "name": name,
        "district": district,
        "address": "1 Wuma Street",
        "contacts": [
            {"name": f"Contact {n}", "phone": phone, "relation": "child"}
            for n, phone in enumerate(phones)
        ],
        "device": {"protocol": protocol, "ident": ident},
    }


def seed_subscriber(
    db: SyncDatabase,
    ident: str,
    *,
    protocol: str = "native",
    phones: tuple[str, ...] = ("+8613800000001", "+8613800000002"),
    now: datetime | None = None,
) -> tuple[int, int]:
    """Insert an active subscriber bound to a device; returns (subscriber_id, device_id)."""
    now = now or datetime(2024, 1, 1, tzinfo=UTC)
    body = subscriber_body(ident, protocol=protocol, phones=phones)
    with db.session_sync() as session, session.begin():
        sub_id = subscriber_repo.create_subscriber(session, body, now)
        device_id = session.scalar(select(Device.id).where(Device.ident == ident))
    assert device_id is not None
    return sub_id, device_id


def seed_many(db: SyncDatabase, idents: list[str], protocol: str = "native") -> dict[str, int]:
    """Seed one subscriber per ident in a single transaction; returns ident -> device id."""
    now = datetime(2024, 1, 1, tzinfo=UTC)
    with db.session_sync() as session, session.begin():
        for ident in idents:
            subscriber_repo.create_subscriber(
                session, subscriber_body(ident, protocol=protocol), now
            )
        rows = session.execute(select(Device.ident, Device.id).where(Device.ident.in_(idents)))
        return {r.ident: r.id for r in rows}
