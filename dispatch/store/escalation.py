"""Escalation repository: policies, durable timers, attempts and incident transitions.

Every function runs inside one transaction (see ``Database``).  A timer fires
by changing its row from ``pending`` to ``done`` in the same transaction that
records what the firing did, so a step never fires twice, even across a crash.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from dispatch.store.errors import Conflict, NotFound
from dispatch.store.models import (
    Attempt,
    Contact,
    Escalation,
    EscalationTimer,
    Incident,
    Policy,
    Subscriber,
    TimelineEntry,
)

OUTCOMES = ("false_alarm", "helped_by_family", "community_visit", "ambulance", "police", "other")
LATE_GRACE = timedelta(seconds=2)


@dataclass
class Fired:
    """What firing a timer did, for the engine to carry out after the commit."""

    incident_id: int
    attempts: list[dict[str, Any]] = field(default_factory=list)
    timers: list[tuple[int, datetime]] = field(default_factory=list)
    context: dict[str, Any] | None = None
    late: bool = False


def _entry(session: Session, incident_id: int, at: datetime, action: str, **kw: Any) -> None:
    session.add(TimelineEntry(incident_id=incident_id, at=at, action=action, **kw))


def _timer(session: Session, incident_id: int, kind: str, wave: int, due: datetime):
    t = EscalationTimer(incident_id=incident_id, kind=kind, wave=wave, due_at=due, status="pending")
    session.add(t)
    session.flush()
    return t.id, due


def _cancel_timers(session: Session, incident_id: int, now: datetime) -> None:
    session.execute(
        update(EscalationTimer)
        .where(EscalationTimer.incident_id == incident_id, EscalationTimer.status == "pending")
        .values(status="cancelled", fired_at=now)
    )


# --- policies ------------------------------------------------------------------------


def policy_dict(p: Policy) -> dict[str, Any]:
    """The API shape of a policy version."""
    return {
        "id": p.id,
        "name": p.name,
        "scope": p.scope,
        "district": p.district,
        "subscriber_id": p.subscriber_id,
        "version": p.version,
        "active": p.active,
        "document": p.document,
        "created_at": p.created_at.isoformat(),
        "created_by": p.created_by,
    }


def save_policy(
    session: Session,
    name: str,
    scope: str,
    district: str | None,
    subscriber_id: int | None,
    document: dict[str, Any],
    actor: str,
    now: datetime,
) -> dict[str, Any]:
    """Store a new version of the policy named ``name`` in its scope; older versions stay."""
    if scope == "subscriber" and session.get(Subscriber, subscriber_id) is None:
        raise NotFound(f"subscriber {subscriber_id} does not exist")
    same = (
        Policy.name == name,
        Policy.scope == scope,
        Policy.district == district,
        Policy.subscriber_id == subscriber_id,
    )
    last = session.scalar(select(func.max(Policy.version)).where(*same)) or 0
    session.execute(update(Policy).where(*same, Policy.active.is_(True)).values(active=False))
    p = Policy(
        name=name,
        scope=scope,
        district=district,
        subscriber_id=subscriber_id,
        version=last + 1,
        active=True,
        document=document,
        created_at=now,
        created_by=actor,
    )
    session.add(p)
    session.flush()
    return policy_dict(p)


def ensure_policies(session: Session, defaults: dict[str, dict[str, Any]], now: datetime) -> int:
    """Install the shipped global policies that have never been stored; returns how many."""
    have = set(session.scalars(select(Policy.name).where(Policy.scope == "global")))
    added = 0
    for name, doc in defaults.items():
        if name not in have:
            save_policy(session, name, "global", None, None, doc, "system", now)
            added += 1
    return added


def list_policies(session: Session, active_only: bool) -> list[dict[str, Any]]:
    """Policies, newest version first within each name."""
    q = select(Policy).order_by(Policy.scope, Policy.name, Policy.version.desc())
    if active_only:
        q = q.where(Policy.active.is_(True))
    return [policy_dict(p) for p in session.scalars(q)]


def get_policy(session: Session, policy_id: int) -> dict[str, Any]:
    """One policy version."""
    p = session.get(Policy, policy_id)
    if p is None:
        raise NotFound(f"policy {policy_id} does not exist")
    return policy_dict(p)


# --- starting an escalation ------------------------------------------------------------


def start_context(session: Session, incident_id: int) -> dict[str, Any] | None:
    """Everything the engine needs to plan an incident, or None if there is nothing to do."""
    inc = session.get(Incident, incident_id)
    if inc is None or inc.status != "open" or session.get(Escalation, incident_id) is not None:
        return None
    sub = session.get(Subscriber, inc.subscriber_id) if inc.subscriber_id else None
    contacts = []
    if sub is not None:
        contacts = [
            {"name": c.name, "phone": c.phone, "relation": c.relation, "tier": c.tier}
            for c in session.scalars(
                select(Contact).where(Contact.subscriber_id == sub.id).order_by(Contact.position)
            )
        ]
    scopes = [(Policy.scope == "global")]
    if sub is not None:
        scopes += [
            (Policy.scope == "district") & (Policy.district == sub.district),
            (Policy.scope == "subscriber") & (Policy.subscriber_id == sub.id),
        ]
    candidates = [
        {"id": p.id, "version": p.version, "scope": p.scope, "document": p.document}
        for p in session.scalars(select(Policy).where(Policy.active.is_(True), or_(*scopes)))
    ]
    location = {"lat": inc.lat, "lon": inc.lon} if inc.lat is not None else None
    subscriber = None
    if sub is not None:
        subscriber = {
            "id": sub.id,
            "name": sub.name,
            "address": sub.address,
            "district": sub.district,
            "village": sub.village,
            "health": sub.health,
            "disability_type": sub.disability_type,
            "notes": sub.notes,
            "living_situation": sub.living_situation,
            "location": location,
            "contacts": contacts,
        }
    return {
        "incident_id": inc.id,
        "kind": inc.kind,
        "created_at": inc.created_at,
        "subscriber": subscriber,
        "contacts": contacts,
        "candidates": candidates,
    }


def start_contexts(session: Session, incident_ids: list[int]) -> list[dict[str, Any]]:
    """``start_context`` for several incidents in one read (those needing a plan)."""
    return [c for c in (start_context(session, i) for i in incident_ids) if c is not None]


def begin_escalations(
    session: Session,
    plans: list[tuple[int, dict[str, Any] | None, dict[str, Any]]],
    now: datetime,
) -> list[tuple[int, datetime]]:
    """``begin_escalation`` for several incidents in one transaction."""
    timers: list[tuple[int, datetime]] = []
    for incident_id, policy, plan in plans:
        timers += begin_escalation(session, incident_id, policy, plan, now)
    return timers


def begin_escalation(
    session: Session,
    incident_id: int,
    policy: dict[str, Any] | None,
    plan: dict[str, Any],
    now: datetime,
) -> list[tuple[int, datetime]]:
    """Record the plan and the first timer (due now); idempotent per incident."""
    if session.get(Escalation, incident_id) is not None:
        return []
    inc = session.get(Incident, incident_id)
    if inc is None or inc.status != "open":
        return []
    session.add(
        Escalation(
            incident_id=incident_id,
            plan=plan,
            cursor=0,
            state="running",
            relay_confirmed=False,
            started_at=now,
        )
    )
    if policy is not None:
        inc.policy_id, inc.policy_version = policy["id"], policy["version"]
    detail = {
        "policy_id": inc.policy_id,
        "policy_version": inc.policy_version,
        "waves": len(plan["waves"]),
    }
    _entry(session, incident_id, now, "escalation_started", actor="engine", detail=detail)
    session.flush()
    return [_timer(session, incident_id, "wave", 0, now)]


# --- firing ------------------------------------------------------------------------------


def pending_timers(session: Session) -> list[tuple[int, datetime]]:
    """Every timer still to fire (loaded at start)."""
    rows = session.execute(
        select(EscalationTimer.id, EscalationTimer.due_at)
        .where(EscalationTimer.status == "pending")
        .order_by(EscalationTimer.due_at)
    )
    return [(r.id, r.due_at) for r in rows]


def unplanned_incidents(session: Session) -> list[int]:
    """Open incidents that never got an escalation (the process died in between)."""
    q = (
        select(Incident.id)
        .outerjoin(Escalation, Escalation.incident_id == Incident.id)
        .where(Incident.status == "open", Escalation.incident_id.is_(None))
        .order_by(Incident.id)
    )
    return list(session.scalars(q))


def fire_timers(session: Session, timer_ids: list[int], now: datetime) -> list[Fired]:
    """Fire several timers in one transaction (each row is still claimed once)."""
    return [f for f in (fire_timer(session, t, now) for t in timer_ids) if f is not None]


def fire_timer(session: Session, timer_id: int, now: datetime) -> Fired | None:
    """Fire one timer: claim it, then place the wave it points at (or wait for a relay)."""
    claimed = session.execute(
        update(EscalationTimer)
        .where(EscalationTimer.id == timer_id, EscalationTimer.status == "pending")
        .values(status="done", fired_at=now)
    ).rowcount
    if not claimed:
        return None
    timer = session.get(EscalationTimer, timer_id)
    inc = session.get(Incident, timer.incident_id)
    esc = session.get(Escalation, timer.incident_id)
    fired = Fired(inc.id, late=now - timer.due_at > LATE_GRACE)
    if inc.status != "open" or esc is None or esc.state in ("stopped", "exhausted"):
        return fired
    relay_ok = esc.relay_confirmed
    wave_no = timer.wave
    if timer.kind == "relay_deadline":
        if esc.state != "waiting_relay":
            return fired
        wave_no, relay_ok = esc.cursor, True
        _entry(
            session,
            inc.id,
            now,
            "relay_deadline_passed",
            tier="operator",
            actor="engine",
            detail={"late": fired.late},
        )
    _place_wave(session, inc, esc, wave_no, relay_ok, now, fired)
    return fired


def _place_wave(
    session: Session,
    inc: Incident,
    esc: Escalation,
    wave_no: int,
    relay_ok: bool,
    now: datetime,
    fired: Fired,
) -> None:
    waves = esc.plan["waves"]
    late = {"late": True} if fired.late else {}
    if wave_no >= len(waves):
        esc.state = "exhausted"
        _entry(
            session,
            inc.id,
            now,
            "escalation_exhausted",
            tier="operator",
            actor="engine",
            outcome="nobody_accepted",
            detail=late or None,
        )
        return
    wave = waves[wave_no]
    esc.cursor = wave_no
    if wave["relay"] and not relay_ok:
        deadline = inc.created_at + timedelta(seconds=esc.plan["relay_deadline_s"])
        if now < deadline:
            esc.state = "waiting_relay"
            desk = wave["targets"][0]
            _entry(
                session,
                inc.id,
                now,
                "relay_pending",
                tier=wave["tier"],
                target=desk["phone"],
                channel="relay",
                outcome="awaiting_operator",
                actor="engine",
                detail={"deadline": deadline.isoformat(), **late},
            )
            fired.timers.append(_timer(session, inc.id, "relay_deadline", wave_no, deadline))
            return
    esc.state = "running"
    esc.relay_confirmed = False
    if wave["tier"] == "operator":
        _entry(
            session,
            inc.id,
            now,
            "operator_alerted",
            tier="operator",
            actor="engine",
            outcome="queued",
            detail=late or None,
        )
    for target in wave["targets"]:
        for channel in wave["channels"]:
            attempt = Attempt(
                id=secrets.token_hex(12),
                incident_id=inc.id,
                wave=wave_no,
                tier=wave["tier"],
                channel=channel,
                target_name=target["name"],
                phone=target["phone"],
                status="calling",
                created_at=now,
            )
            session.add(attempt)
            _entry(
                session,
                inc.id,
                now,
                "relay" if channel == "relay" else "notify",
                tier=wave["tier"],
                target=f"{target['name']} {target['phone']}",
                channel=channel,
                outcome="sent",
                actor="engine",
                detail={"attempt": attempt.id, "relation": target.get("relation"), **late},
            )
            fired.attempts.append(
                {
                    "id": attempt.id,
                    "tier": wave["tier"],
                    "channel": channel,
                    "phone": target["phone"],
                    "name": target["name"],
                    "relation": target.get("relation"),
                    "wave": wave_no,
                }
            )
    fired.context = {
        "kind": inc.kind,
        "created_at": inc.created_at,
        "subscriber": esc.plan.get("subscriber"),
        "location": {"lat": inc.lat, "lon": inc.lon} if inc.lat is not None else None,
    }
    fired.timers.append(
        _timer(session, inc.id, "wave", wave_no + 1, now + timedelta(seconds=wave["wait_s"]))
    )


# --- answers -----------------------------------------------------------------------------


def _advance_now(session: Session, inc: Incident, wave_no: int, now: datetime):
    """If every attempt of the current wave has ended without acceptance, move on now."""
    open_attempts = session.scalar(
        select(func.count())
        .select_from(Attempt)
        .where(Attempt.incident_id == inc.id, Attempt.wave == wave_no, Attempt.status == "calling")
    )
    if open_attempts:
        return []
    nxt = session.scalar(
        select(EscalationTimer).where(
            EscalationTimer.incident_id == inc.id,
            EscalationTimer.status == "pending",
            EscalationTimer.kind == "wave",
            EscalationTimer.wave == wave_no + 1,
        )
    )
    if nxt is None:
        return []
    nxt.due_at = now
    return [(nxt.id, now)]


def answer_attempt(
    session: Session, attempt_id: str, answer: str, responder: str | None, now: datetime
) -> dict[str, Any]:
    """Apply a responder's answer; returns ``{"result", "incident_id", "timers"}``."""
    attempt = session.get(Attempt, attempt_id)
    if attempt is None:
        raise NotFound(f"attempt {attempt_id} does not exist")
    inc = session.get(Incident, attempt.incident_id, with_for_update=True)
    if attempt.status != "calling":
        raise Conflict(f"attempt {attempt_id} was already answered ({attempt.status})")
    if inc.status != "open":
        raise Conflict(f"incident {inc.id} is {inc.status}")
    status = {"accept": "accepted", "decline": "declined", "failed": "failed"}[answer]
    attempt.status, attempt.answered_at = status, now
    _entry(
        session,
        inc.id,
        now,
        "answer",
        tier=attempt.tier,
        target=f"{attempt.target_name} {attempt.phone}",
        channel=attempt.channel,
        outcome=status,
        actor=responder or attempt.phone,
        detail={"attempt": attempt.id},
    )
    timers: list[tuple[int, datetime]] = []
    if status == "accepted":
        inc.status, inc.acknowledged_at, inc.updated_at = "acknowledged", now, now
        inc.acknowledged_by, inc.acknowledged_tier = attempt.target_name, attempt.tier
        _stop(session, inc, now)
    else:
        timers = _advance_now(session, inc, attempt.wave, now)
    return {
        "result": status,
        "incident_id": inc.id,
        "timers": timers,
        "tier": attempt.tier,
        "created_at": inc.created_at,
    }


def _stop(session: Session, inc: Incident, now: datetime) -> None:
    _cancel_timers(session, inc.id, now)
    session.execute(
        update(Attempt)
        .where(Attempt.incident_id == inc.id, Attempt.status == "calling")
        .values(status="cancelled")
    )
    esc = session.get(Escalation, inc.id)
    if esc is not None:
        esc.state = "stopped"


# --- operator actions --------------------------------------------------------------------


def operator_action(
    session: Session,
    incident_id: int,
    action: str,
    actor: str,
    now: datetime,
    outcome: str | None = None,
    text: str | None = None,
) -> dict[str, Any]:
    """claim, acknowledge, resolve, note, relay_confirm or relay_skip, with conflicts as 409."""
    inc = session.get(Incident, incident_id, with_for_update=True)
    if inc is None:
        raise NotFound(f"incident {incident_id} does not exist")
    timers: list[tuple[int, datetime]] = []
    entry: dict[str, Any] = {"tier": "operator", "actor": actor}
    if action == "claim":
        if inc.status == "resolved":
            raise Conflict(f"incident {incident_id} is resolved")
        if inc.claimed_by not in (None, actor):
            raise Conflict(f"incident {incident_id} is claimed by {inc.claimed_by}")
        inc.claimed_by = actor
    elif action == "acknowledge":
        if inc.status != "open":
            raise Conflict(f"incident {incident_id} is already {inc.status}")
        inc.status, inc.acknowledged_at = "acknowledged", now
        inc.acknowledged_by, inc.acknowledged_tier = actor, "operator"
        _stop(session, inc, now)
    elif action == "resolve":
        if inc.status == "resolved":
            raise Conflict(f"incident {incident_id} was already resolved by {inc.outcome!r}")
        inc.status, inc.resolved_at, inc.outcome = "resolved", now, outcome
        _stop(session, inc, now)
        entry["outcome"] = outcome
    elif action == "note":
        entry["detail"] = {"text": text}
    elif action in ("relay_confirm", "relay_skip"):
        timers = _relay_decision(session, inc, action, now)
    else:
        raise ValueError(action)
    inc.updated_at = now
    _entry(session, inc.id, now, action, **entry)
    session.flush()
    return {"timers": timers, "status": inc.status, "kind": inc.kind, "created_at": inc.created_at}


def _relay_decision(session: Session, inc: Incident, action: str, now: datetime):
    esc = session.get(Escalation, inc.id)
    if inc.status != "open" or esc is None or esc.state != "waiting_relay":
        raise Conflict(f"incident {inc.id} has no 110/120 relay waiting for a decision")
    _cancel_timers(session, inc.id, now)
    esc.state = "running"
    if action == "relay_confirm":
        esc.relay_confirmed = True
        return [_timer(session, inc.id, "wave", esc.cursor, now)]
    return [_timer(session, inc.id, "wave", esc.cursor + 1, now)]


def open_counts(session: Session) -> dict[str, int]:
    """Unresolved incidents per kind (for the gauge)."""
    rows = session.execute(
        select(Incident.kind, func.count())
        .where(Incident.status != "resolved")
        .group_by(Incident.kind)
    )
    return {kind: n for kind, n in rows}
