"""Storing a group of SOS frames with a few Core statements instead of the ORM per frame.

:func:`dispatch.store.incidents.record_sos` stores one frame through the ORM: about six
statements and ~2 ms of CPU per SOS, which made a burst of 1,000 presses take seconds to
acknowledge.  :func:`record_sos_batch` stores a whole group in one pass: one SELECT for the
frames it may be a resend of, one for the open alarms of the devices that pressed, one
INSERT per table for the new rows and one executemany UPDATE for the alarms joined.

The rows stored and the :class:`SosRecord` returned for each frame are exactly those of
calling ``record_sos`` for the frames one after another in the same transaction (a frame
sees the frames before it in the group); ``tests/integration/test_sos_batch_store.py``
checks that on random sequences, on SQLite and PostgreSQL.  A change to the rules of one
must be made to the other.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session

from dispatch.store.incidents import ALARM_KINDS, PRIORITY, SosInput, SosRecord
from dispatch.store.models import EventLog, Incident, SosFrame, TimelineEntry

# Frames per pass: keeps the IN lists (device ids + seqs, 2,000 at most) under SQLite's
# limit of 32,766 bound parameters (3.32+) whatever group size a caller hands in.
CHUNK = 1_000

_incidents = Incident.__table__
_timeline = TimelineEntry.__table__
_frames = SosFrame.__table__
_events = EventLog.__table__

_UPDATE_SEEN = (
    update(_incidents)
    .where(_incidents.c.id == bindparam("b_id"))
    .values(updated_at=bindparam("b_updated_at"))
)
_UPDATE_SEEN_AT = (
    update(_incidents)
    .where(_incidents.c.id == bindparam("b_id"))
    .values(
        updated_at=bindparam("b_updated_at"),
        lat=bindparam("b_lat"),
        lon=bindparam("b_lon"),
        accuracy_m=bindparam("b_accuracy_m"),
    )
)


@dataclass(slots=True)
class _Alarm:
    """An incident the group opens or joins, and what the group does to it."""

    id: int | None  # None until a new incident's INSERT has returned it
    row: dict[str, Any] | None = None  # the INSERT values of an incident the group opens
    updated_at: datetime | None = None  # last press that joined an existing incident
    location: tuple[float | None, float | None, int | None] | None = None


@dataclass(slots=True)
class _Plan:
    """What the group does with one frame."""

    sos: SosInput
    # For a resend: the alarm of the stored frame it repeats, or the earlier new frame of
    # this group it repeats (whose alarm is known only once pass 2 has run).
    resends: _Alarm | _Plan | None
    alarm: _Alarm | None = None
    created: bool = False
    detail: dict[str, Any] | None = None

    @property
    def duplicate(self) -> bool:
        return self.resends is not None

    def incident_id(self) -> int:
        """The incident this frame opened, joined or repeats."""
        origin = self.resends
        if origin is None:
            alarm = self.alarm
        elif isinstance(origin, _Plan):
            alarm = origin.alarm
        else:
            alarm = origin
        assert alarm is not None and alarm.id is not None
        return alarm.id


@dataclass(slots=True)
class _Sent:
    """A frame stored before: in the database, or earlier in this group."""

    terminal_time: int | None
    received_at: datetime
    origin: _Alarm | _Plan


def record_sos_batch(
    session: Session, frames: Sequence[SosInput], dedup_window: timedelta
) -> list[SosRecord]:
    """Store SOS frames in order, as ``record_sos`` would one by one, with bulk statements.

    Returns one :class:`SosRecord` per frame, in the order given.  Runs in the caller's
    transaction; nothing is committed here.
    """
    records: list[SosRecord] = []
    for start in range(0, len(frames), CHUNK):
        # Each chunk's SELECTs see the rows the chunks before it inserted.
        records.extend(_store(session, frames[start : start + CHUNK], dedup_window))
    return records


def _store(session: Session, frames: Sequence[SosInput], window: timedelta) -> list[SosRecord]:
    if not frames:
        return []
    sent = _stored_frames(session, frames, window)
    # Pass 1, resends: whether a frame is a duplicate depends on frames only, so the open
    # incidents need looking up only for devices that sent something new.
    plans: list[_Plan] = []
    for sos in frames:
        key = (sos.device_id, sos.seq)
        plan = _Plan(sos, resends=_resend_of(sent.get(key, ()), sos, window))
        if plan.resends is None:
            # Later frames of the group may resend this one.
            sent.setdefault(key, []).append(_Sent(sos.terminal_time, sos.received_at, plan))
        plans.append(plan)
    new = [plan for plan in plans if not plan.duplicate]
    open_alarm = _open_alarms(session, sorted({plan.sos.device_id for plan in new}))
    # Pass 2, new presses in frame order: join the device's open alarm or open one.
    opened: list[_Alarm] = []
    for plan in new:
        sos = plan.sos
        alarm = open_alarm.get(sos.device_id)
        plan.created = alarm is None
        if alarm is None:
            alarm = _Alarm(id=None, row=_new_incident(sos))
            opened.append(alarm)
            open_alarm[sos.device_id] = alarm
        _touch(alarm, sos)
        plan.alarm = alarm
        plan.detail = dict(sos.detail or {}, seq=sos.seq, kind=sos.kind)
    _insert_incidents(session, opened)
    _update_joined(session, open_alarm.values())
    _insert_rows(session, new)
    return [
        SosRecord(plan.incident_id(), created=plan.created, duplicate=plan.duplicate)
        for plan in plans
    ]


def _stored_frames(
    session: Session, frames: Sequence[SosInput], window: timedelta
) -> dict[tuple[int, int], list[_Sent]]:
    """Stored frames that any frame of the group may resend, oldest id first per key."""
    since = min(sos.received_at for sos in frames) - window
    # device IN and seq IN select a superset of the (device, seq) pairs; both backends
    # use ix_sos_frames_device_seq for it, and the extra rows are dropped below.
    rows = session.execute(
        select(
            _frames.c.device_id,
            _frames.c.seq,
            _frames.c.terminal_time,
            _frames.c.received_at,
            _frames.c.incident_id,
        )
        .where(
            _frames.c.device_id.in_(sorted({sos.device_id for sos in frames})),
            _frames.c.seq.in_(sorted({sos.seq for sos in frames})),
            _frames.c.received_at >= since,
        )
        .order_by(_frames.c.id)
    )
    wanted = {(sos.device_id, sos.seq) for sos in frames}
    alarms: dict[int, _Alarm] = {}
    sent: dict[tuple[int, int], list[_Sent]] = {}
    for device_id, seq, terminal_time, received_at, incident_id in rows:
        if (device_id, seq) not in wanted:
            continue
        alarm = alarms.setdefault(incident_id, _Alarm(id=incident_id))
        sent.setdefault((device_id, seq), []).append(_Sent(terminal_time, received_at, alarm))
    return sent


def _resend_of(
    candidates: Sequence[_Sent], sos: SosInput, window: timedelta
) -> _Alarm | _Plan | None:
    """What the newest stored frame ``sos`` repeats belongs to (record_sos's dedup query)."""
    since = sos.received_at - window
    for c in reversed(candidates):
        if c.received_at < since:
            continue
        # A terminal that rebooted may reuse a seq; its clock tells the presses apart.
        if sos.terminal_time is None or c.terminal_time in (None, sos.terminal_time):
            return c.origin
    return None


def _open_alarms(session: Session, device_ids: list[int]) -> dict[int, _Alarm]:
    """Each device's newest unresolved SOS/fall incident."""
    if not device_ids:
        return {}
    rows = session.execute(
        select(_incidents.c.id, _incidents.c.device_id).where(
            _incidents.c.device_id.in_(device_ids),
            _incidents.c.kind.in_(ALARM_KINDS),
            _incidents.c.status != "resolved",
        )
    )
    newest: dict[int, int] = {}
    for incident_id, device_id in rows:
        if incident_id > newest.get(device_id, 0):
            newest[device_id] = incident_id
    return {device_id: _Alarm(id=incident_id) for device_id, incident_id in newest.items()}


def _new_incident(sos: SosInput) -> dict[str, Any]:
    return {
        "kind": sos.kind,
        "status": "open",
        "priority": PRIORITY[sos.kind],
        "subscriber_id": sos.subscriber_id,
        "device_id": sos.device_id,
        "device_ident": sos.device_ident,
        "lat": None,
        "lon": None,
        "accuracy_m": None,
        "created_at": sos.received_at,
        "updated_at": sos.received_at,
    }


def _touch(alarm: _Alarm, sos: SosInput) -> None:
    """What record_sos does to the incident a press opens or joins."""
    location = (sos.lat, sos.lon, sos.accuracy_m) if sos.lat is not None else None
    if alarm.row is not None:
        alarm.row["updated_at"] = sos.received_at
        if location is not None:
            alarm.row["lat"], alarm.row["lon"], alarm.row["accuracy_m"] = location
        return
    alarm.updated_at = sos.received_at
    if location is not None:
        alarm.location = location


def _insert_incidents(session: Session, opened: list[_Alarm]) -> None:
    if not opened:
        return
    if not session.get_bind().dialect.insert_executemany_returning:
        # SQLite before 3.35 has no RETURNING: one INSERT per incident the group opens.
        for alarm in opened:
            result = session.execute(insert(_incidents), alarm.row)
            alarm.id = result.inserted_primary_key[0]
        return
    # A group opens at most one incident per device (later presses join it), so the
    # device id maps RETURNING rows back whatever order the database returns them in.
    by_device = {alarm.row["device_id"]: alarm for alarm in opened if alarm.row is not None}
    assert len(by_device) == len(opened)
    result = session.execute(
        insert(_incidents).returning(_incidents.c.id, _incidents.c.device_id),
        [alarm.row for alarm in opened],
    )
    for incident_id, device_id in result:
        by_device[device_id].id = incident_id
    assert all(alarm.id is not None for alarm in opened)


def _update_joined(session: Session, alarms: Iterable[_Alarm]) -> None:
    """One executemany UPDATE for the existing incidents the group's presses joined."""
    plain: list[dict[str, Any]] = []
    located: list[dict[str, Any]] = []
    for alarm in alarms:
        if alarm.row is not None or alarm.updated_at is None:
            continue  # opened by this group (already inserted as it ends) or not pressed
        params = {"b_id": alarm.id, "b_updated_at": alarm.updated_at}
        if alarm.location is None:
            plain.append(params)
        else:
            params["b_lat"], params["b_lon"], params["b_accuracy_m"] = alarm.location
            located.append(params)
    if plain:
        session.execute(_UPDATE_SEEN, plain)
    if located:
        session.execute(_UPDATE_SEEN_AT, located)


def _insert_rows(session: Session, new: list[_Plan]) -> None:
    timeline: list[dict[str, Any]] = []
    sos_frames: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for plan in new:
        sos, incident_id = plan.sos, plan.incident_id()
        timeline.append(
            {
                "incident_id": incident_id,
                "at": sos.received_at,
                "action": "alarm" if plan.created else "alarm_repeat",
                "target": sos.device_ident,
                "channel": "terminal",
                "outcome": "received",
                "actor": "terminal",
                "detail": plan.detail,
            }
        )
        sos_frames.append(
            {
                "device_id": sos.device_id,
                "seq": sos.seq,
                "received_at": sos.received_at,
                "terminal_time": sos.terminal_time,
                "incident_id": incident_id,
            }
        )
        events.append(
            {
                "at": sos.received_at,
                "kind": sos.kind,
                "device_ident": sos.device_ident,
                "subscriber_id": sos.subscriber_id,
                "incident_id": incident_id,
                "data": plan.detail,
            }
        )
    if not new:
        return
    # Rows go in frame order, so ids come out in the order record_sos would give them.
    session.execute(insert(_timeline), timeline)
    session.execute(insert(_frames), sos_frames)
    session.execute(insert(_events), events)
