"""Live-state rows written through the driver are stored exactly as SQLAlchemy stores them.

On SQLite the flush converts its parameters before the write transaction and
executes through the driver; care's silence query compares ``last_seen`` in SQL,
so the stored text must be identical, not merely equal when read back.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.dialects import postgresql

from dispatch.store import devices as device_repo
from tests.unit.fakes import SyncDatabase, seed_many

IDENTS = [f"86000000000090{n}" for n in range(4)]


def _rows(ids: list[int], seen: datetime) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [
        {"id": ids[0], "online": True, "last_seen": seen, "battery": 80, "signal": 70,
         "charging": False, "lat": 27.994, "lon": 120.699},
        {"id": ids[1], "online": False, "last_seen": None, "battery": None, "signal": None,
         "charging": None, "lat": None, "lon": None},
        {"id": ids[2], "online": True, "last_seen": seen.replace(microsecond=0), "battery": 5,
         "signal": 0, "charging": True, "lat": None, "lon": None,
         "firmware": "2.0.1", "protocol_version": 1},
        {"id": ids[3], "online": True, "last_seen": seen, "battery": 100, "signal": 31,
         "charging": False, "lat": -0.5, "lon": 0.0, "firmware": None, "protocol_version": 2},
    ]  # fmt: skip
    return rows


def _stored(path: str) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(path)
    try:
        return con.execute(
            "SELECT id, online, last_seen, battery, signal, charging, lat, lon, firmware,"
            " protocol_version FROM devices ORDER BY id"
        ).fetchall()
    finally:
        con.close()


def _flush(url: str, prepared: bool) -> list[tuple[Any, ...]]:
    db = SyncDatabase(url)
    ids = list(seed_many(db, IDENTS).values())
    seen = datetime(2026, 12, 4, 20, 0, 1, 123456, tzinfo=UTC)
    rows = _rows(sorted(ids), seen)
    chunk = device_repo.prepare_live(rows, db.sql_dialect) if prepared else rows
    assert isinstance(chunk, device_repo.PreparedRows) is prepared
    assert db.write(device_repo.flush_live, chunk).result == len(rows)
    db.stop()
    return _stored(url.removeprefix("sqlite:///"))


def test_driver_path_stores_the_same_bytes_as_sqlalchemy(tmp_path) -> None:
    """Same rows, both paths, two fresh databases: every stored value is identical."""
    core = _flush(f"sqlite:///{tmp_path / 'core.db'}", prepared=False)
    driver = _flush(f"sqlite:///{tmp_path / 'driver.db'}", prepared=True)
    assert driver == core
    assert {row[2] for row in core} == {
        "2026-12-04 20:00:01.123456",
        "2026-12-04 20:00:01.000000",
        None,
    }


def test_other_databases_get_the_rows_unchanged() -> None:
    """PostgreSQL locks rows, not the database: no driver path there."""
    rows = [{"id": 1, "online": True, "last_seen": None}]
    assert device_repo.prepare_live(rows, postgresql.dialect()) is rows
    assert device_repo.prepare_live(rows, None) is rows
