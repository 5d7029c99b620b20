"""Due timers fire in shared transactions, and a failing batch loses nothing."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from dispatch.store import incidents as incident_repo
from tests.unit.fakes import seed_subscriber
from tests.unit.test_engine import World, result_of, run


@pytest.fixture
def bench(sqlite_url: str) -> Any:
    """A started engine (see test_engine.World) to add incidents to."""
    w = World(sqlite_url)
    yield w
    w.close()


def _incident(w: World, ident: str) -> int:
    sub_id, device_id = seed_subscriber(w.db, ident)
    sos = incident_repo.SosInput(
        device_id=device_id,
        device_ident=ident,
        subscriber_id=sub_id,
        seq=1,
        kind="sos",
        received_at=w.now(),
    )
    record = result_of(w.db.write(incident_repo.record_sos, sos, timedelta(minutes=5)))
    return record.incident_id


def test_timers_due_together_share_one_transaction(bench: World) -> None:
    """Three incidents planned at the same instant: their first waves fire in one write."""
    ids = [_incident(bench, f"86000000000010{n}") for n in range(3)]
    for iid in ids:
        run(bench.engine.start_incident(iid))
    before = bench.db.count_calls(fn_name="fire_timers")
    bench.clock.advance(0)
    assert bench.db.count_calls(fn_name="fire_timers") - before == 1
    assert all(bench.actions(iid, "notify") for iid in ids)


def test_failed_batch_falls_back_to_single_timers_and_loses_nothing(bench: World) -> None:
    """The batch write fails: each timer is fired on its own and every wave goes out once."""
    ids = [_incident(bench, f"86000000000020{n}") for n in range(2)]
    for iid in ids:
        run(bench.engine.start_incident(iid))
    bench.db.fail_next = {"write"}
    bench.clock.advance(0)
    for iid in ids:
        notes = bench.actions(iid, "notify")
        assert len(notes) == 2  # voice and SMS to the first contact, once each
    assert bench.db.count_calls(fn_name="fire_timers") >= 3  # the failed batch + two singles
