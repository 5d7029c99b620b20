"""Group commit of SOS frames: one transaction in flight, the rest wait and go together."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.internet import defer

from dispatch.sos_commit import SosCommitter, record_batch
from dispatch.store.incidents import SosInput
from dispatch.store.models import EventLog, Incident, SosFrame, TimelineEntry
from tests.unit.fakes import SyncDatabase, seed_subscriber

NOW = datetime(2026, 12, 4, 2, 0, tzinfo=UTC)


class HeldDatabase:
    """``urgent`` returns a Deferred the test fires by hand, recording each batch."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[SosInput], defer.Deferred]] = []

    def urgent(self, fn: Any, items: list[SosInput], window: timedelta) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.calls.append((items, d))
        return d


def sos(seq: int, device_id: int = 1, terminal_time: int | None = 1_800_000_000) -> SosInput:
    return SosInput(
        device_id=device_id,
        device_ident="860000000000001",
        subscriber_id=1,
        seq=seq,
        kind="sos",
        received_at=NOW,
        terminal_time=terminal_time,
    )


def test_frames_arriving_during_a_commit_share_the_next_one() -> None:
    """The first SOS commits alone; the three that arrive meanwhile commit together."""
    db = HeldDatabase()
    committer = SosCommitter(db, timedelta(hours=24))
    first = committer.submit(sos(1))
    rest = [committer.submit(sos(n)) for n in (2, 3, 4)]
    assert [len(items) for items, _ in db.calls] == [1]
    db.calls[0][1].callback(["r1"])
    assert first.result == "r1" and not any(d.called for d in rest)
    assert [len(items) for items, _ in db.calls] == [1, 3]
    db.calls[1][1].callback(["r2", "r3", "r4"])
    assert [d.result for d in rest] == ["r2", "r3", "r4"]


def test_when_idle_fires_once_no_sos_waits_for_the_store() -> None:
    """Idle: None. Busy: a Deferred that fires only after the last queued group commits."""
    db = HeldDatabase()
    committer = SosCommitter(db, timedelta(hours=24))
    assert committer.when_idle() is None
    committer.submit(sos(1))
    committer.submit(sos(2))  # waits for the first commit: a second group
    idle = committer.when_idle()
    gave_up = committer.when_idle()
    assert idle is not None and gave_up is not None
    gave_up.cancel()  # a waiter that timed out must not break the others
    gave_up.addErrback(lambda _: None)
    db.calls[0][1].callback(["r1"])
    assert not idle.called  # the second group is now being committed
    db.calls[1][1].callback(["r2"])
    assert idle.called and idle.result is None
    assert committer.when_idle() is None


def test_a_failed_batch_fails_every_frame_in_it_and_the_next_batch_still_runs() -> None:
    """A rolled-back group acks nobody in it (they resend); later frames are unaffected."""
    db = HeldDatabase()
    committer = SosCommitter(db, timedelta(hours=24))
    first = committer.submit(sos(1))
    second = committer.submit(sos(2))
    db.calls[0][1].errback(RuntimeError("disk full"))
    failures: list[Any] = []
    first.addErrback(failures.append)
    assert len(failures) == 1
    db.calls[1][1].callback(["ok"])
    assert second.result == "ok"


def test_batch_size_is_bounded() -> None:
    """A burst larger than max_batch is split across transactions."""
    db = HeldDatabase()
    committer = SosCommitter(db, timedelta(hours=24), max_batch=2)
    committer.submit(sos(1))
    for n in range(2, 7):
        committer.submit(sos(n))
    db.calls[0][1].callback([None])
    db.calls[1][1].callback([None, None])
    db.calls[2][1].callback([None, None])
    assert [len(items) for items, _ in db.calls] == [1, 2, 2, 1]


def test_a_resend_inside_the_same_batch_is_a_duplicate(sqlite_url: str) -> None:
    """Two copies of one frame in one transaction: one incident, the second is a duplicate."""
    db = SyncDatabase(sqlite_url)
    _, device_id = seed_subscriber(db, "860000000000001")
    records = db.urgent(
        record_batch, [sos(7, device_id), sos(7, device_id)], timedelta(hours=24)
    ).result
    assert (records[0].created, records[0].duplicate) == (True, False)
    assert (records[1].duplicate, records[1].incident_id) == (True, records[0].incident_id)
    db.stop()


def test_reused_seq_with_a_new_terminal_time_is_a_new_alarm(sqlite_url: str) -> None:
    """A rebooted terminal reusing seq 1 with a later clock is not taken for a resend."""
    from dispatch.store import incidents as incident_repo

    db = SyncDatabase(sqlite_url)
    _, device_id = seed_subscriber(db, "860000000000001")
    window = timedelta(hours=24)
    first = db.urgent(incident_repo.record_sos, sos(1, device_id, 1_800_000_000), window).result
    resend = db.urgent(incident_repo.record_sos, sos(1, device_id, 1_800_000_000), window).result
    reboot = db.urgent(incident_repo.record_sos, sos(1, device_id, 1_800_003_600), window).result
    assert first.created and resend.duplicate
    assert not reboot.duplicate and reboot.incident_id == first.incident_id  # joins, as a press
    db.stop()


def test_reused_seq_with_a_new_terminal_time_in_one_batch_is_a_new_press(sqlite_url: str) -> None:
    """The same three frames as above in one group: the same answers."""
    db = SyncDatabase(sqlite_url)
    _, device_id = seed_subscriber(db, "860000000000001")
    frames = [sos(1, device_id, 1_800_000_000)] * 2 + [sos(1, device_id, 1_800_003_600)]
    first, resend, reboot = db.urgent(record_batch, frames, timedelta(hours=24)).result
    assert (first.created, first.duplicate) == (True, False)
    assert (resend.duplicate, resend.incident_id) == (True, first.incident_id)
    assert (reboot.created, reboot.duplicate) == (False, False)
    assert reboot.incident_id == first.incident_id
    assert db.count(SosFrame) == 2
    db.stop()


class HeldRealDatabase:
    """A real database whose urgent transactions run only when the test releases them."""

    def __init__(self, db: SyncDatabase) -> None:
        self.db = db
        self.held: list[tuple[Any, tuple[Any, ...], defer.Deferred]] = []

    def urgent(self, fn: Any, *args: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.held.append((fn, args, d))
        return d

    def release(self) -> None:
        """Run the oldest held transaction for real and fire its Deferred."""
        fn, args, d = self.held.pop(0)
        self.db.urgent(fn, *args).chainDeferred(d)


def test_a_group_with_a_failing_frame_loses_nothing(db_url: str) -> None:
    """One frame the store rejects rolls its whole group back: nobody in it is acked.

    Every frame is then either acked and stored, or refused and absent (its terminal
    resends); the resends are stored as new presses, not taken for duplicates of rows
    the rollback removed.
    """
    real = SyncDatabase(db_url)
    _, device_id = seed_subscriber(real, "860000000000001")
    _, other_id = seed_subscriber(real, "860000000000002")
    db = HeldRealDatabase(real)
    committer = SosCommitter(db, timedelta(hours=24))
    lone = committer.submit(sos(1, device_id))
    good = committer.submit(sos(1, other_id))
    # A terminal whose device row is gone (unbound between look-up and store): FK violation.
    bad = committer.submit(sos(1, 999_999))
    again = committer.submit(sos(2, device_id, 1_800_000_100))
    db.release()
    assert lone.result.created
    assert [len(args[0]) for _, args, _ in db.held] == [3]
    db.release()
    refused: list[Any] = []
    for d in (good, bad, again):
        d.addErrback(refused.append)
    assert len(refused) == 3  # nobody in the failed group is acked
    assert not db.held  # and the committer is idle, ready for the next group
    # Only the lone press is stored: nothing half-written by the failed group.
    assert (real.count(SosFrame), real.count(Incident), real.count(TimelineEntry)) == (1, 1, 1)
    assert real.count(EventLog, EventLog.kind == "sos") == 1
    # The two good terminals resend; the next group stores them as the presses they are.
    good_resent = committer.submit(sos(1, other_id))
    again_resent = committer.submit(sos(2, device_id, 1_800_000_100))
    db.release()  # the first resend goes alone, the second waits for it
    db.release()
    assert (good_resent.result.created, good_resent.result.duplicate) == (True, False)
    assert (again_resent.result.duplicate, again_resent.result.incident_id) == (
        False,
        lone.result.incident_id,
    )
    assert (real.count(SosFrame), real.count(Incident)) == (3, 2)
    real.stop()
