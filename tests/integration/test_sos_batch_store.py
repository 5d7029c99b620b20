"""The bulk SOS path stores exactly what ``record_sos`` stores frame by frame.

``record_sos_batch`` replaces the ORM's six statements per SOS with a few statements per
group; the gateway and the escalation engine act on its records (new incident, joined,
duplicate), so it must agree with ``record_sos`` on every frame.  The property test plays
random histories (several terminals, resends, reboots that reuse seq with a new terminal
clock, terminals without a clock, presses joining open alarms, alarms resolved between
groups, non-alarm incidents that must not be joined, resends outside the dedup window)
through both paths, on SQLite and PostgreSQL, and compares the records and every stored row.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import delete, event, select, update
from sqlalchemy.orm import Session

from dispatch.store import sos_batch
from dispatch.store.incidents import PRIORITY, SosInput, SosRecord, record_sos
from dispatch.store.models import Device, EventLog, Incident, SosFrame, TimelineEntry
from dispatch.store.sos_batch import record_sos_batch
from tests.unit.fakes import SyncDatabase, seed_many

WINDOW = timedelta(minutes=10)  # short, so some histories resend after the window
START = datetime(2026, 12, 4, 2, 0, tzinfo=UTC)
IDENTS = [f"86000000000010{n}" for n in range(5)]


@pytest.fixture
def db(db_url: str) -> Iterator[SyncDatabase]:
    """A migrated database on each backend."""
    database = SyncDatabase(db_url)
    yield database
    database.stop()


# --- random histories -----------------------------------------------------------------


@dataclass
class Terminal:
    """What one simulated terminal has sent, so it can resend, press again or reboot."""

    device_id: int
    ident: str
    subscriber_id: int
    has_clock: bool
    seq: int = 0
    boot: int = 1_800_000_000
    sent: list[tuple[int, int | None]] = field(default_factory=list)


# ("group", [SosInput, ...]), or ("resolve" | "offline" | "alarm", device_id)
Step = tuple[str, Any]


def history(rng: random.Random, terminals: list[Terminal]) -> list[Step]:
    """A random sequence of SOS groups and incident changes between them."""
    now = START
    steps: list[Step] = []
    for _ in range(rng.randint(3, 12)):
        roll = rng.random()
        if roll < 0.2:
            steps.append(("resolve", rng.choice(terminals).device_id))
            continue
        if roll < 0.25:
            steps.append(("offline", rng.choice(terminals).device_id))
            continue
        if roll < 0.28:
            # A second open alarm on the device (entered by hand): presses join the newest.
            steps.append(("alarm", rng.choice(terminals).device_id))
            continue
        # Mostly seconds apart; sometimes past the dedup window, or so close to its end
        # that it closes in the middle of the group (a group spans ~120 ms).
        jump = rng.random()
        if jump < 0.1:
            now += timedelta(minutes=11)
        elif jump < 0.2:
            now += WINDOW - timedelta(milliseconds=rng.randint(0, 150))
        else:
            now += timedelta(seconds=rng.randint(0, 5))
        group: list[SosInput] = []
        for _ in range(rng.randint(1, 12)):
            t = rng.choice(terminals)
            action = rng.random()
            if t.sent and action < 0.35:
                seq, terminal_time = rng.choice(t.sent)  # a resend
                if rng.random() < 0.25:
                    terminal_time = None  # ... without its clock field: matches any clock
            else:
                if action > 0.8:
                    # Reboot: seq starts again, the clock moved on (unless there is none).
                    t.seq, t.boot = 0, t.boot + rng.randint(60, 3_600)
                t.seq += 1
                terminal_time = t.boot + t.seq if t.has_clock else None
                if terminal_time is not None and rng.random() < 0.1:
                    terminal_time = None  # a frame that lost its clock field
                seq = t.seq
                t.sent.append((seq, terminal_time))
            # Frames reach the gateway in order, a few milliseconds apart; now and then
            # one carries an earlier time (the rules must hold whatever the order).
            jitter = rng.randint(-3, 20) if rng.random() < 0.1 else rng.randint(0, 20)
            at = now + timedelta(milliseconds=len(group) * 10 + jitter)
            located = rng.random() < 0.4
            group.append(
                SosInput(
                    device_id=t.device_id,
                    device_ident=t.ident,
                    subscriber_id=t.subscriber_id,
                    seq=seq,
                    kind=rng.choice(("sos", "sos", "fall")),
                    received_at=at,
                    terminal_time=terminal_time,
                    lat=round(rng.uniform(27.9, 28.1), 6) if located else None,
                    lon=round(rng.uniform(120.6, 120.8), 6) if located else None,
                    accuracy_m=rng.choice((None, 5, 30)) if located else None,
                    detail=rng.choice(
                        (None, {"trigger": "button", "battery": rng.randint(0, 100)})
                    ),
                )
            )
        steps.append(("group", group))
    return steps


def clear(session: Session) -> None:
    """Remove every incident and what hangs off it (devices and subscribers stay)."""
    for model in (TimelineEntry, SosFrame, EventLog, Incident):
        session.execute(delete(model))


def resolve_newest(session: Session, device_id: int, at: datetime) -> None:
    """An operator resolves the device's newest open alarm, if it has one."""
    newest = session.scalar(
        select(Incident.id)
        .where(
            Incident.device_id == device_id,
            Incident.kind.in_(("sos", "fall")),
            Incident.status != "resolved",
        )
        .order_by(Incident.id.desc())
        .limit(1)
    )
    if newest is not None:
        session.execute(
            update(Incident)
            .where(Incident.id == newest)
            .values(status="resolved", resolved_at=at, outcome="handled")
        )


def open_incident(session: Session, terminal: Terminal, kind: str, at: datetime) -> None:
    """An incident opened outside the SOS path ("offline" must never be joined by a press)."""
    session.add(
        Incident(
            kind=kind,
            status="open",
            priority=PRIORITY[kind],
            subscriber_id=terminal.subscriber_id,
            device_id=terminal.device_id,
            device_ident=terminal.ident,
            created_at=at,
            updated_at=at,
        )
    )


Store = Callable[[Session, list[SosInput], timedelta], list[SosRecord]]


def one_by_one(session: Session, frames: list[SosInput], window: timedelta) -> list[SosRecord]:
    """The reference: record_sos for each frame, in one transaction, as before."""
    return [record_sos(session, sos, window) for sos in frames]


def play(
    db: SyncDatabase, steps: list[Step], terminals: list[Terminal], store: Store
) -> dict[str, Any]:
    """Run a history from empty tables; return its records and stored rows, ids as ranks."""
    with db.session_sync() as session, session.begin():
        clear(session)
    records: list[list[SosRecord]] = []
    by_device = {t.device_id: t for t in terminals}
    for kind, arg in steps:
        if kind == "group":
            records.append(db.urgent(store, arg, WINDOW).result)
        else:
            with db.session_sync() as session, session.begin():
                if kind == "resolve":
                    resolve_newest(session, arg, START)
                else:
                    open_incident(
                        session, by_device[arg], "sos" if kind == "alarm" else kind, START
                    )
    return snapshot(db, records)


def snapshot(db: SyncDatabase, records: list[list[SosRecord]]) -> dict[str, Any]:
    """Records and rows with every id replaced by its rank in its table.

    PostgreSQL's sequences do not restart when rows are deleted, so the two runs of a
    history get different ids; the ranks (the order rows were inserted in) must agree.
    """

    def read(session: Session) -> dict[str, Any]:
        incidents = session.scalars(select(Incident).order_by(Incident.id)).all()
        rank = {i.id: n for n, i in enumerate(incidents)}
        return {
            "records": [
                [(rank[r.incident_id], r.created, r.duplicate) for r in group] for group in records
            ],
            "incidents": [
                (
                    i.kind,
                    i.status,
                    i.priority,
                    i.subscriber_id,
                    i.device_id,
                    i.device_ident,
                    i.lat,
                    i.lon,
                    i.accuracy_m,
                    i.outcome,
                    i.created_at,
                    i.updated_at,
                    i.resolved_at,
                )
                for i in incidents
            ],
            "timeline": [
                (
                    rank[t.incident_id],
                    t.at,
                    t.action,
                    t.tier,
                    t.target,
                    t.channel,
                    t.outcome,
                    t.actor,
                    t.detail,
                )
                for t in session.scalars(select(TimelineEntry).order_by(TimelineEntry.id))
            ],
            "sos_frames": [
                (f.device_id, f.seq, f.terminal_time, f.received_at, rank[f.incident_id])
                for f in session.scalars(select(SosFrame).order_by(SosFrame.id))
            ],
            "event_log": [
                (
                    e.at,
                    e.kind,
                    e.device_ident,
                    e.subscriber_id,
                    None if e.incident_id is None else rank[e.incident_id],
                    e.data,
                )
                for e in session.scalars(select(EventLog).order_by(EventLog.id))
            ],
        }

    return db.query(read)


def seeded_terminals(db: SyncDatabase, rng: random.Random) -> list[Terminal]:
    """One subscriber and terminal per ident."""
    ids = seed_many(db, IDENTS)
    owners = dict(db.query(lambda s: s.execute(select(Device.id, Device.subscriber_id)).all()))
    return [
        Terminal(ids[ident], ident, owners[ids[ident]], has_clock=rng.random() < 0.7)
        for ident in IDENTS
    ]


# --- the property ---------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [sos_batch.CHUNK, 3])
def test_batch_path_stores_what_record_sos_stores_frame_by_frame(
    db: SyncDatabase, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random histories: same records, same rows, same order, on both backends.

    With a chunk of 3 a group is stored in several passes, each seeing the ones before.
    """
    monkeypatch.setattr(sos_batch, "CHUNK", chunk)
    rng = random.Random(20261204 + chunk)
    terminals = seeded_terminals(db, rng)
    seen = {"duplicate": 0, "created": 0, "joined": 0, "resolved": 0}
    for example in range(50):
        for t in terminals:
            t.seq, t.sent, t.has_clock = 0, [], rng.random() < 0.7
        steps = history(rng, terminals)
        expected = play(db, steps, terminals, one_by_one)
        got = play(db, steps, terminals, record_sos_batch)
        for key in expected:
            assert got[key] == expected[key], f"example {example}: {key} differ; steps={steps!r}"
        flat = [r for group in expected["records"] for r in group]
        seen["duplicate"] += sum(dup for _, _, dup in flat)
        seen["created"] += sum(created for _, created, _ in flat)
        seen["joined"] += sum(not created and not dup for _, created, dup in flat)
        seen["resolved"] += sum(1 for i in expected["incidents"] if i[1] == "resolved")
    # The histories really exercised every outcome.
    assert all(n > 10 for n in seen.values()), seen


# --- the cases the gateway depends on, spelled out ------------------------------------


def frame(
    device_id: int,
    seq: int,
    terminal_time: int | None = 1_800_000_000,
    *,
    at: datetime = START,
    lat: float | None = None,
    kind: str = "sos",
) -> SosInput:
    return SosInput(
        device_id=device_id,
        device_ident=f"ident-{device_id}",
        subscriber_id=None,
        seq=seq,
        kind=kind,
        received_at=at,
        terminal_time=terminal_time,
        lat=lat,
        lon=None if lat is None else 120.7,
        accuracy_m=None if lat is None else 10,
    )


def test_two_presses_of_one_device_in_a_group_open_one_incident(db: SyncDatabase) -> None:
    """The second press joins the incident the first opened, as it would one at a time."""
    ids = seed_many(db, IDENTS[:2])
    a, b = ids[IDENTS[0]], ids[IDENTS[1]]
    records = db.urgent(
        record_sos_batch,
        [
            frame(a, 1),
            frame(b, 1),
            frame(a, 2, 1_800_000_005, lat=28.0),
            frame(a, 1),  # resend of the first
            frame(a, 1, 1_800_003_600),  # rebooted, reused seq 1: a press, not a resend
        ],
        WINDOW,
    ).result
    first, other, second, resend, reboot = records
    assert (first.created, first.duplicate) == (True, False)
    assert (other.created, other.incident_id != first.incident_id) == (True, True)
    assert (second.created, second.duplicate, second.incident_id) == (
        False,
        False,
        first.incident_id,
    )
    assert (resend.duplicate, resend.incident_id) == (True, first.incident_id)
    assert (reboot.created, reboot.duplicate, reboot.incident_id) == (
        False,
        False,
        first.incident_id,
    )
    assert db.count(Incident) == 2
    assert db.count(SosFrame) == 4  # the resend is not stored again
    actions = db.query(
        lambda s: s.scalars(
            select(TimelineEntry.action)
            .where(TimelineEntry.incident_id == first.incident_id)
            .order_by(TimelineEntry.id)
        ).all()
    )
    assert actions == ["alarm", "alarm_repeat", "alarm_repeat"]
    lat = db.query(lambda s: s.scalar(select(Incident.lat).where(Incident.id == first.incident_id)))
    assert lat == 28.0


def test_a_resend_without_its_clock_repeats_the_newest_matching_frame(db: SyncDatabase) -> None:
    """seq 1 pressed, resolved, pressed again after a reboot: a clockless copy repeats the last.

    Both stored frames match a copy without terminal time; record_sos takes the newest.
    """
    device_id = seed_many(db, IDENTS[:1])[IDENTS[0]]
    terminal = Terminal(device_id, IDENTS[0], 0, has_clock=True)
    later = START + timedelta(seconds=30)
    steps: list[Step] = [
        ("group", [frame(device_id, 1, 1_800_000_001)]),
        ("resolve", device_id),
        ("group", [frame(device_id, 1, 1_800_000_901, at=later)]),
        ("group", [frame(device_id, 1, None, at=later + timedelta(seconds=5))]),
    ]
    expected = play(db, steps, [terminal], one_by_one)
    got = play(db, steps, [terminal], record_sos_batch)
    assert got == expected
    # Ranks: incident 0 was resolved, the reboot's press opened incident 1.
    assert got["records"] == [[(0, True, False)], [(1, True, False)], [(1, False, True)]]


def count_statements(session: Session) -> list[str]:
    """Every SQL statement the session's connection sends from now on."""
    sent: list[str] = []
    event.listen(
        session.connection(),
        "before_cursor_execute",
        lambda _c, _cur, statement, *_: sent.append(statement.split()[0].upper()),
    )
    return sent


def test_a_group_costs_a_few_statements_not_a_few_per_frame(db: SyncDatabase) -> None:
    """50 new presses: 2 SELECTs and one INSERT per table; 50 resends: one SELECT."""
    ids = list(seed_many(db, [f"8600000000002{n:02d}" for n in range(50)]).values())
    frames = [frame(device_id, 1) for device_id in ids]

    def store(session: Session, group: list[SosInput]) -> tuple[list[SosRecord], list[str]]:
        sent = count_statements(session)
        return record_sos_batch(session, group, WINDOW), sent

    records, sent = db.urgent(store, frames).result
    assert all(r.created for r in records)
    assert sent == ["SELECT", "SELECT", "INSERT", "INSERT", "INSERT", "INSERT"]
    records, sent = db.urgent(store, frames).result
    assert all(r.duplicate for r in records)
    assert sent == ["SELECT"]
    # New presses of the same devices join: one UPDATE (executemany) for the 50 incidents.
    records, sent = db.urgent(store, [frame(device_id, 2) for device_id in ids]).result
    assert not any(r.created or r.duplicate for r in records)
    assert sent == ["SELECT", "SELECT", "UPDATE", "INSERT", "INSERT", "INSERT"]


def test_without_executemany_returning_incidents_are_inserted_one_by_one(
    db: SyncDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite older than 3.35 has no RETURNING: the same records, one INSERT per incident."""
    ids = list(seed_many(db, IDENTS[:3]).values())

    def store(session: Session, group: list[SosInput]) -> list[SosRecord]:
        monkeypatch.setattr(session.get_bind().dialect, "insert_executemany_returning", False)
        return record_sos_batch(session, group, WINDOW)

    records = db.urgent(store, [frame(i, 1) for i in ids] + [frame(ids[0], 2)]).result
    assert [r.created for r in records] == [True, True, True, False]
    assert records[3].incident_id == records[0].incident_id
    stored = db.query(
        lambda s: s.execute(select(Incident.id, Incident.device_id).order_by(Incident.id)).all()
    )
    assert [(r.incident_id, i) for r, i in zip(records, ids, strict=False)] == [
        tuple(row) for row in stored
    ]
