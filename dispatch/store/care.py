"""Care repository: plans, rounds, silence detection queries and the care report.

A round moves ``scheduled`` → ``prompted`` → ``answered`` | back to ``scheduled``
(a retry) | ``missed``.  ``next_action_at`` is when the scheduler must next look
at it (the prompt time, then the answer deadline), so the scheduler reads only
an index range, never the whole table.
"""

from __future__ import annotations

import secrets
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import and_, exists, func, select, update
from sqlalchemy.orm import Session

from dispatch.store.errors import Conflict, NotFound
from dispatch.store.incidents import PRIORITY
from dispatch.store.models import (
    CarePlanOverride,
    CareRound,
    Contact,
    Device,
    EventLog,
    Incident,
    Subscriber,
    TimelineEntry,
)

ACTIVE = ("scheduled", "prompted")
LOCAL = ZoneInfo("Asia/Shanghai")


# --- plans -----------------------------------------------------------------------------


def save_plan(
    session: Session,
    scope: str,
    key: str | int,
    document: dict[str, Any],
    actor: str,
    now: datetime,
) -> None:
    """Store the care-plan document for a district or a subscriber (replacing the old one)."""
    if scope == "subscriber":
        if session.get(Subscriber, key) is None:
            raise NotFound(f"subscriber {key} does not exist")
        row = session.scalar(
            select(CarePlanOverride).where(
                CarePlanOverride.scope == "subscriber", CarePlanOverride.subscriber_id == key
            )
        )
    else:
        row = session.scalar(
            select(CarePlanOverride).where(
                CarePlanOverride.scope == "district", CarePlanOverride.district == key
            )
        )
    if row is None:
        row = CarePlanOverride(
            scope=scope,
            district=key if scope == "district" else None,
            subscriber_id=key if scope == "subscriber" else None,
        )
        session.add(row)
    row.document, row.updated_at, row.updated_by = document, now, actor
    if scope == "subscriber":
        # The next round is recomputed from the new plan.
        session.execute(
            update(CareRound)
            .where(
                CareRound.subscriber_id == key,
                CareRound.status == "scheduled",
                CareRound.attempts == 0,
            )
            .values(status="cancelled", next_action_at=now)
        )


def plan_inputs(session: Session, subscriber_id: int) -> dict[str, Any]:
    """The profile and plan documents that decide one subscriber's care plan."""
    sub = session.get(Subscriber, subscriber_id)
    if sub is None:
        raise NotFound(f"subscriber {subscriber_id} does not exist")
    docs = _plan_docs(session, [sub.id], {sub.district})
    return {
        "subscriber_id": sub.id,
        "living_situation": sub.living_situation,
        "district": sub.district,
        "district_doc": docs["district"].get(sub.district),
        "subscriber_doc": docs["subscriber"].get(sub.id),
    }


def _plan_docs(session: Session, ids: list[int], districts: set[str]) -> dict[str, dict]:
    out: dict[str, dict] = {"district": {}, "subscriber": {}}
    for row in session.scalars(
        select(CarePlanOverride).where(
            (CarePlanOverride.subscriber_id.in_(ids)) | (CarePlanOverride.district.in_(districts))
        )
    ):
        if row.scope == "district":
            out["district"][row.district] = row.document
        else:
            out["subscriber"][row.subscriber_id] = row.document
    return out


# --- planning rounds -------------------------------------------------------------------


def unplanned(
    session: Session, limit: int, after_id: int = 0, only: int | None = None
) -> list[dict[str, Any]]:
    """Active subscribers with a terminal and no round pending, with their plan inputs.

    ``only`` restricts it to one subscriber (after that subscriber's round ended).
    """
    pending = exists().where(CareRound.subscriber_id == Subscriber.id, CareRound.status.in_(ACTIVE))
    rows = session.execute(
        select(Subscriber.id, Subscriber.district, Subscriber.living_situation)
        .where(
            Subscriber.status == "active",
            ~pending,
            Subscriber.id > after_id,
            exists().where(Device.subscriber_id == Subscriber.id),
            *([Subscriber.id == only] if only is not None else []),
        )
        .order_by(Subscriber.id)
        .limit(limit)
    ).all()
    docs = _plan_docs(session, [r.id for r in rows], {r.district for r in rows})
    return [
        {
            "subscriber_id": r.id,
            "district": r.district,
            "living_situation": r.living_situation,
            "district_doc": docs["district"].get(r.district),
            "subscriber_doc": docs["subscriber"].get(r.id),
        }
        for r in rows
    ]


def last_due(session: Session, subscriber_ids: list[int]) -> dict[int, datetime]:
    """The latest due time of each subscriber's past rounds (to plan the next after it)."""
    rows = session.execute(
        select(CareRound.subscriber_id, func.max(CareRound.due_at))
        .where(CareRound.subscriber_id.in_(subscriber_ids), CareRound.status != "cancelled")
        .group_by(CareRound.subscriber_id)
    )
    return {sid: due for sid, due in rows}


def insert_rounds(session: Session, rows: list[dict[str, Any]]) -> int:
    """Insert planned rounds (keys: subscriber_id, district, due_at, params, reason)."""
    if not rows:
        return 0
    session.execute(
        CareRound.__table__.insert(),
        [
            {
                "status": "scheduled",
                "attempts": 0,
                "late": False,
                "next_action_at": r["due_at"],
                **r,
            }
            for r in rows
        ],
    )
    return len(rows)


def insert_rounds_returning(session: Session, rows: list[dict[str, Any]]) -> list[int]:
    """Insert rounds one by one and return their ids (for the few made on demand)."""
    ids = []
    for r in rows:
        rnd = CareRound(status="scheduled", attempts=0, late=False, next_action_at=r["due_at"], **r)
        session.add(rnd)
        session.flush()
        ids.append(rnd.id)
    return ids


def plan_next(
    session: Session, subscriber_id: int, now: datetime, planner: Any
) -> list[dict[str, Any]]:
    """Plan one subscriber's next round in one transaction; ``planner(inputs, after)``
    returns the row to insert (or None), so the schedule maths stay in routing."""
    [inputs] = unplanned(session, 1, 0, subscriber_id) or [None]
    if inputs is None:
        return []
    last = last_due(session, [subscriber_id]).get(subscriber_id, now)
    row = planner(inputs, max(now, last))
    if row is None:
        return []
    insert_rounds(session, [row])
    return [row]


def due_rounds(
    session: Session, until: datetime, limit: int
) -> list[tuple[int, datetime, str | None]]:
    """Rounds needing action by ``until`` with their terminal's ident (an index range read)."""
    rows = session.execute(
        select(CareRound.id, CareRound.next_action_at, Device.ident)
        .outerjoin(Device, Device.subscriber_id == CareRound.subscriber_id)
        .where(CareRound.status.in_(ACTIVE), CareRound.next_action_at <= until)
        .order_by(CareRound.next_action_at)
        .limit(limit)
    )
    return [(r.id, r.next_action_at, r.ident) for r in rows]


# --- acting on rounds ------------------------------------------------------------------


def _target(session: Session, rnd: CareRound) -> dict[str, Any]:
    sub = session.get(Subscriber, rnd.subscriber_id)
    device = session.scalar(select(Device).where(Device.subscriber_id == sub.id).limit(1))
    return {
        "round_id": rnd.id,
        "subscriber_id": sub.id,
        "name": sub.name,
        "phone": sub.phone,
        "address": sub.address,
        "district": sub.district,
        "disability_type": sub.disability_type,
        "device_ident": device.ident if device else None,
        "protocol": device.protocol if device else None,
        "params": rnd.params,
        "attempts": rnd.attempts,
        "reason": rnd.reason,
    }


def act(
    session: Session,
    round_id: int,
    now: datetime,
    late_after: timedelta,
    channel: str | None = None,
) -> dict | None:
    """The scheduler's turn on a round: prompt it, or judge its expired answer window.

    Returns what to do: ``{"do": "prompt", ...target}``, ``{"do": "retry", "at"}``,
    ``{"do": "missed", "incident_id"}`` or None when the round needs nothing now.
    """
    rnd = session.get(CareRound, round_id, with_for_update=True)
    if rnd is None or rnd.status not in ACTIVE:
        return None
    if rnd.next_action_at > now:
        # A stale timer (an older refill) fired early: tell the scheduler the real time.
        return {"do": "wait", "at": rnd.next_action_at, "round_id": rnd.id}
    late = now - rnd.next_action_at > late_after
    if rnd.status == "prompted":
        outcome = _expired(session, rnd, now, late)
        if outcome["do"] != "retry" or outcome["at"] > now:
            return outcome
        late = True  # the retry itself came due while we were down: prompt it now
    rnd.status, rnd.attempts, rnd.prompted_at = "prompted", rnd.attempts + 1, now
    rnd.late = rnd.late or late
    rnd.callback_token = secrets.token_hex(12)
    rnd.channel = channel
    rnd.next_action_at = now + timedelta(seconds=rnd.params["answer_window_s"])
    return {
        "do": "prompt",
        "late": late,
        "token": rnd.callback_token,
        "deadline": rnd.next_action_at,
        "channel": channel,
        **_target(session, rnd),
    }


def _expired(session: Session, rnd: CareRound, now: datetime, late: bool) -> dict[str, Any]:
    rnd.late = rnd.late or late
    if rnd.attempts <= rnd.params["retries"]:
        rnd.status = "scheduled"
        # Counted from the missed deadline: a retry that came due while down goes now.
        retry_at = rnd.next_action_at + timedelta(seconds=rnd.params["retry_spacing_s"])
        rnd.next_action_at = max(now, retry_at)
        return {"do": "retry", "at": rnd.next_action_at, "round_id": rnd.id, "late": late}
    rnd.status, rnd.answer = "missed", None
    incident_id = open_incident(
        session,
        "care_missed",
        rnd.subscriber_id,
        now,
        {"round_id": rnd.id, "attempts": rnd.attempts, "channel": rnd.channel, "late": late},
    )
    rnd.incident_id = incident_id
    return {
        "do": "missed",
        "incident_id": incident_id,
        "round_id": rnd.id,
        "subscriber_id": rnd.subscriber_id,
        "late": late,
    }


def set_channel(session: Session, round_id: int, channel: str) -> None:
    """Record how the round was put to the subscriber (terminal or voice)."""
    session.execute(update(CareRound).where(CareRound.id == round_id).values(channel=channel))


def answer(
    session: Session,
    round_id: int | None,
    token: str | None,
    value: str,
    now: datetime,
    subscriber_id: int | None = None,
) -> dict[str, Any]:
    """Apply an answer (``ok``, ``help``, ``no_input``) from the terminal or a care call."""
    q = select(CareRound).with_for_update()
    q = (
        q.where(CareRound.id == round_id)
        if token is None
        else q.where(CareRound.callback_token == token)
    )
    rnd = session.scalar(q)
    if rnd is None or (subscriber_id is not None and rnd.subscriber_id != subscriber_id):
        raise NotFound("no such care round for this subscriber")
    if rnd.status not in ACTIVE:
        raise Conflict(f"care round {rnd.id} is already {rnd.status}")
    if value == "no_input":
        rnd.next_action_at = now  # the terminal gave up waiting: judge it now
        return {"result": "no_input", "round_id": rnd.id, "act_now": True}
    rnd.status, rnd.answer, rnd.answered_at = "answered", value, now
    result: dict[str, Any] = {
        "result": value,
        "round_id": rnd.id,
        "incident_id": None,
        "subscriber_id": rnd.subscriber_id,
    }
    if value == "help":
        rnd.incident_id = result["incident_id"] = open_incident(
            session,
            "sos",
            rnd.subscriber_id,
            now,
            {"round_id": rnd.id, "source": "care_check", "channel": rnd.channel},
            action="care_help",
        )
    return result


# --- incidents raised by care and silence ------------------------------------------------


def open_incident(
    session: Session,
    kind: str,
    subscriber_id: int,
    now: datetime,
    detail: dict[str, Any],
    action: str | None = None,
) -> int:
    """Open an incident for a subscriber (not from a terminal frame)."""
    device = session.scalar(select(Device).where(Device.subscriber_id == subscriber_id).limit(1))
    inc = Incident(
        kind=kind,
        status="open",
        priority=PRIORITY[kind],
        subscriber_id=subscriber_id,
        device_id=device.id if device else None,
        device_ident=device.ident if device else None,
        created_at=now,
        updated_at=now,
        lat=device.lat if device else None,
        lon=device.lon if device else None,
    )
    session.add(inc)
    session.flush()
    session.add(
        TimelineEntry(
            incident_id=inc.id,
            at=now,
            action=action or kind,
            actor="scheduler",
            outcome="detected",
            detail=detail,
        )
    )
    session.add(
        EventLog(
            at=now,
            kind=kind,
            device_ident=inc.device_ident,
            subscriber_id=subscriber_id,
            incident_id=inc.id,
            data=detail,
        )
    )
    return inc.id


def _no_open(kind: str):
    return ~exists().where(
        Incident.subscriber_id == Subscriber.id,
        Incident.kind == kind,
        Incident.status != "resolved",
    )


def silent_devices(session: Session, before: datetime, now: datetime, limit: int) -> list[int]:
    """Open ``offline`` incidents for devices silent since ``before``; returns their ids."""
    rows = session.execute(
        select(Subscriber.id, Device.last_seen)
        .join(Device, Device.subscriber_id == Subscriber.id)
        .where(
            Device.online.is_(False),
            Device.last_seen < before,
            Subscriber.status == "active",
            _no_open("offline"),
            # Once an operator resolves an offline incident, the same silence is not raised
            # again: the device must be seen and fall silent anew.
            ~exists().where(
                Incident.subscriber_id == Subscriber.id,
                Incident.kind == "offline",
                Incident.created_at >= Device.last_seen,
            ),
        )
        .limit(limit)
    ).all()
    return [
        open_incident(
            session, "offline", sid, now, {"last_seen": seen.isoformat() if seen else None}
        )
        for sid, seen in rows
    ]


def low_battery(session: Session, device_ident: str, battery: int, now: datetime) -> int | None:
    """Open a ``low_battery`` incident for the device's subscriber unless one is open."""
    sid = session.scalar(
        select(Subscriber.id)
        .join(Device, Device.subscriber_id == Subscriber.id)
        .where(Device.ident == device_ident, Subscriber.status == "active", _no_open("low_battery"))
    )
    if sid is None:
        return None
    return open_incident(session, "low_battery", sid, now, {"battery": battery})


def inactive(session: Session, since: datetime, now: datetime, limit: int) -> list[int]:
    """Subscribers due a check now: a round missed and no care answer or button press since
    ``since``, and no care_missed incident still open (then the family is already on it)."""
    answered = exists().where(
        CareRound.subscriber_id == Subscriber.id, CareRound.answered_at >= since
    )
    pressed = exists().where(
        Incident.subscriber_id == Subscriber.id,
        Incident.kind.in_(("sos", "fall")),
        Incident.created_at >= since,
    )
    checked = exists().where(
        CareRound.subscriber_id == Subscriber.id,
        CareRound.reason == "inactivity",
        CareRound.due_at >= since,
    )
    pending = exists().where(
        CareRound.subscriber_id == Subscriber.id,
        CareRound.status.in_(ACTIVE),
        CareRound.due_at <= now,
    )
    # Only people who were asked and did not answer: right after a deployment nobody has
    # had a round yet, and 300,000 "inactive" calls at once would help no one.
    missed = exists().where(
        CareRound.subscriber_id == Subscriber.id,
        CareRound.status == "missed",
        CareRound.due_at >= since,
    )
    rows = session.execute(
        select(Subscriber.id, Subscriber.district)
        .where(
            Subscriber.status == "active",
            Subscriber.created_at < since,
            exists().where(Device.subscriber_id == Subscriber.id),
            missed,
            ~answered,
            ~pressed,
            ~checked,
            ~pending,
            _no_open("care_missed"),
        )
        .limit(limit)
    ).all()
    return [sid for sid, _ in rows]


# --- reading ------------------------------------------------------------------------------


def round_dict(r: CareRound) -> dict[str, Any]:
    """The API shape of a care round."""
    return {
        "id": r.id,
        "due_at": r.due_at.isoformat(),
        "status": r.status,
        "attempts": r.attempts,
        "channel": r.channel,
        "answer": r.answer,
        "reason": r.reason,
        "late": r.late,
        "incident_id": r.incident_id,
        "prompted_at": r.prompted_at.isoformat() if r.prompted_at else None,
        "answered_at": r.answered_at.isoformat() if r.answered_at else None,
    }


def history(session: Session, subscriber_id: int, limit: int) -> list[dict[str, Any]]:
    """A subscriber's rounds, newest first."""
    if session.get(Subscriber, subscriber_id) is None:
        raise NotFound(f"subscriber {subscriber_id} does not exist")
    rows = session.scalars(
        select(CareRound)
        .where(CareRound.subscriber_id == subscriber_id)
        .order_by(CareRound.due_at.desc())
        .limit(limit)
    )
    return [round_dict(r) for r in rows]


def report(
    session: Session, district: str | None, start: datetime, end: datetime
) -> list[dict[str, Any]]:
    """Per district and local day: rounds due, answered, missed, and the answer rate."""
    q = select(CareRound.district, CareRound.due_at, CareRound.status).where(
        and_(CareRound.due_at >= start, CareRound.due_at < end), CareRound.status != "cancelled"
    )
    if district:
        q = q.where(CareRound.district == district)
    counts: dict[tuple[str, str], dict[str, int]] = defaultdict(
        lambda: {"due": 0, "answered": 0, "missed": 0, "pending": 0}
    )
    for d, due, status in session.execute(q.execution_options(yield_per=10_000)):
        c = counts[(d, due.astimezone(LOCAL).date().isoformat())]
        c["due"] += 1
        c[status if status in ("answered", "missed") else "pending"] += 1
    out = []
    for (d, day), c in sorted(counts.items()):
        closed = c["answered"] + c["missed"]
        out.append(
            {
                "district": d,
                "date": day,
                **c,
                "answer_rate": round(c["answered"] / closed, 4) if closed else None,
            }
        )
    return out


def contact_phones(session: Session, subscriber_id: int) -> list[str]:
    """Family phone numbers, in calling order."""
    return list(
        session.scalars(
            select(Contact.phone)
            .where(Contact.subscriber_id == subscriber_id, Contact.tier == "family")
            .order_by(Contact.position)
        )
    )
