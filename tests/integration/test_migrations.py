"""The Alembic migrations build exactly the schema the models describe, on both backends."""

from __future__ import annotations

import pytest_twisted
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from dispatch.store.db import Database, make_engine, upgrade
from dispatch.store.models import Base


def test_migrations_match_models(db_url):
    """After `upgrade head` autogenerate finds nothing to change."""
    upgrade(db_url)
    engine = create_engine(db_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def test_upgrade_is_idempotent(db_url):
    """Running the upgrade twice (a restart) is harmless and keeps the tables."""
    upgrade(db_url)
    upgrade(db_url)
    engine = create_engine(db_url)
    names = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {"subscribers", "devices", "incidents", "incident_timeline", "event_log"} <= names


def test_sqlite_runs_in_wal_mode(sqlite_url):
    """The embedded default uses WAL with full fsync, so an acked SOS survives a power cut."""
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
    engine.dispose()


def _commit_durability(session) -> str:
    """What this transaction's commit promises, as the backend reports it."""
    if session.get_bind().dialect.name == "sqlite":
        return {2: "fsync", 1: "no_fsync"}[session.execute(text("PRAGMA synchronous")).scalar()]
    setting = session.execute(text("SHOW synchronous_commit")).scalar()
    return "fsync" if setting == "on" else "no_fsync"


@pytest_twisted.ensureDeferred
async def test_only_relaxed_writes_skip_the_fsync(db_url):
    """Alarms and ordinary writes wait for the disk; durable=False (live state) does not."""
    from twisted.internet import reactor

    upgrade(db_url)
    db = Database(db_url, reactor)
    db.start()
    try:
        assert await db.urgent(_commit_durability) == "fsync"
        assert await db.write(_commit_durability) == "fsync"
        assert await db.write(_commit_durability, durable=False) == "no_fsync"
        # The relaxed setting is per transaction: the next durable write is durable again.
        assert await db.write(_commit_durability) == "fsync"
        assert await db.urgent(_commit_durability) == "fsync"
    finally:
        db.stop()
