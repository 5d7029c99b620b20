"""Incident repository: the SOS write path, the live queue and incident detail."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, or_, select
from sqlalchemy.orm import Session, selectinload

from dispatch.store.errors import NotFound
from dispatch.store.models import Escalation, EventLog, Incident, SosFrame, TimelineEntry

# Lower is more urgent; the live queue sorts on it.
PRIORITY = {"sos": 1, "fall": 1, "care_missed": 2, "offline": 3, "low_battery": 4}
ALARM_KINDS = ("sos", "fall")
STATUSES = ("open", "acknowledged", "resolved")


@dataclass(frozen=True, slots=True)
class SosRecord:
    """What storing one SOS frame did."""

    incident_id: int
    created: bool  # a new incident was opened
    duplicate: bool  # a retransmission of a frame already stored


@dataclass(frozen=True, slots=True)
class SosInput:
    """An SOS frame as the store needs it (no protocol details)."""

    device_id: int
    device_ident: str
    subscriber_id: int | None
    seq: int
    kind: str
    received_at: datetime
    terminal_time: int | None = None
    lat: float | None = None
    lon: float | None = None
    accuracy_m: int | None = None
    detail: dict[str, Any] | None = None


def record_sos(session: Session, sos: SosInput, dedup_window: timedelta) -> SosRecord:
    """Store an SOS frame: dedupe by (device, seq), join an open alarm or open a new one.

    The gateway stores SOS frames in groups with ``sos_batch.record_sos_batch``, which
    must give the same rows and records as this function frame by frame (a test compares
    them): change the rules in both.
    """
    since = sos.received_at - dedup_window
    same = [
        SosFrame.device_id == sos.device_id,
        SosFrame.seq == sos.seq,
        SosFrame.received_at >= since,
    ]
    if sos.terminal_time is not None:
        # A terminal that rebooted may reuse a seq; its clock tells the presses apart.
        same.append(
            or_(SosFrame.terminal_time.is_(None), SosFrame.terminal_time == sos.terminal_time)
        )
    seen = session.scalar(
        select(SosFrame.incident_id).where(*same).order_by(SosFrame.id.desc()).limit(1)
    )
    if seen is not None:
        return SosRecord(seen, created=False, duplicate=True)
    incident = session.scalar(
        select(Incident)
        .where(
            Incident.device_id == sos.device_id,
            Incident.kind.in_(ALARM_KINDS),
            Incident.status != "resolved",
        )
        .order_by(Incident.id.desc())
        .limit(1)
    )
    created = incident is None
    if incident is None:
        incident = Incident(
            kind=sos.kind,
            status="open",
            priority=PRIORITY[sos.kind],
            subscriber_id=sos.subscriber_id,
            device_id=sos.device_id,
            device_ident=sos.device_ident,
            created_at=sos.received_at,
            updated_at=sos.received_at,
        )
        session.add(incident)
    incident.updated_at = sos.received_at
    if sos.lat is not None:
        incident.lat, incident.lon, incident.accuracy_m = sos.lat, sos.lon, sos.accuracy_m
    session.flush()
    detail = dict(sos.detail or {}, seq=sos.seq, kind=sos.kind)
    session.add(
        TimelineEntry(
            incident_id=incident.id,
            at=sos.received_at,
            action="alarm" if created else "alarm_repeat",
            target=sos.device_ident,
            channel="terminal",
            outcome="received",
            actor="terminal",
            detail=detail,
        )
    )
    session.add(
        SosFrame(
            device_id=sos.device_id,
            seq=sos.seq,
            received_at=sos.received_at,
            terminal_time=sos.terminal_time,
            incident_id=incident.id,
        )
    )
    session.add(
        EventLog(
            at=sos.received_at,
            kind=sos.kind,
            device_ident=sos.device_ident,
            subscriber_id=sos.subscriber_id,
            incident_id=incident.id,
            data=detail,
        )
    )
    return SosRecord(incident.id, created=created, duplicate=False)


def _timeline_entry(t: TimelineEntry) -> dict[str, Any]:
    return {
        "at": t.at.isoformat(),
        "action": t.action,
        "tier": t.tier,
        "target": t.target,
        "channel": t.channel,
        "outcome": t.outcome,
        "actor": t.actor,
        "detail": t.detail,
    }


def incident_dict(i: Incident, with_timeline: bool = True) -> dict[str, Any]:
    """The API shape of an incident."""
    out: dict[str, Any] = {
        "id": i.id,
        "kind": i.kind,
        "status": i.status,
        "priority": i.priority,
        "subscriber_id": i.subscriber_id,
        "device_ident": i.device_ident,
        "created_at": i.created_at.isoformat(),
        "updated_at": i.updated_at.isoformat(),
        "acknowledged_at": i.acknowledged_at.isoformat() if i.acknowledged_at else None,
        "resolved_at": i.resolved_at.isoformat() if i.resolved_at else None,
        "outcome": i.outcome,
        "claimed_by": i.claimed_by,
        "acknowledged_by": i.acknowledged_by,
        "acknowledged_tier": i.acknowledged_tier,
        "policy_id": i.policy_id,
        "policy_version": i.policy_version,
        "location": (
            {"lat": i.lat, "lon": i.lon, "accuracy_m": i.accuracy_m} if i.lat is not None else None
        ),
    }
    if with_timeline:
        out["timeline"] = [_timeline_entry(t) for t in i.timeline]
    return out


def list_incidents(
    session: Session,
    status: str | None = None,
    district_subscribers: Any = None,
    limit: int = 100,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """The queue: unresolved first, then by priority, oldest first within a priority."""
    status_rank = case(
        (Incident.status == "open", 0), (Incident.status == "acknowledged", 1), else_=2
    )
    q = select(Incident).order_by(status_rank, Incident.priority, Incident.created_at, Incident.id)
    if status:
        q = q.where(Incident.status == status)
    if district_subscribers is not None:
        q = q.where(Incident.subscriber_id.in_(district_subscribers))
    rows = session.scalars(q.limit(limit).offset(offset))
    return [incident_dict(i, with_timeline=False) for i in rows]


def get_incident(session: Session, incident_id: int) -> dict[str, Any]:
    """One incident with its whole timeline."""
    incident = session.scalar(
        select(Incident).where(Incident.id == incident_id).options(selectinload(Incident.timeline))
    )
    if incident is None:
        raise NotFound(f"incident {incident_id} does not exist")
    out = incident_dict(incident)
    esc = session.get(Escalation, incident_id)
    out["escalation"] = None
    if esc is not None:
        waves = esc.plan.get("waves", [])
        nxt = waves[esc.cursor] if esc.cursor < len(waves) else None
        out["escalation"] = {
            "state": esc.state,
            "step": esc.cursor,
            "steps": len(waves),
            "current_tier": nxt["tier"] if nxt else None,
        }
    return out
