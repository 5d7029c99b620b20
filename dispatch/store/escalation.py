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

from sqlalchemy import func, insert, or_, select, update
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

# Most ids one IN list carries: far below SQLite's and PostgreSQL's bound-parameter limits,
# and above the engine's batch size, so an engine batch is one statement per table.
MAX_IN = 500


def _context(
    inc: Any, sub: Any, contacts: list[dict[str, Any]], candidates: list[dict[str, Any]]
) -> dict[str, Any]:
    """The planning context of one incident, from its row, its subscriber's and theirs."""
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
        # Incidents with the same candidate policies choose the same one for a kind: the
        # engine parses and chooses once per key and batch (a policy row never changes).
        "policy_key": tuple(c["id"] for c in candidates),
    }


def _candidate(p: Any) -> dict[str, Any]:
    return {"id": p.id, "version": p.version, "scope": p.scope, "document": p.document}


def _contact(c: Any) -> dict[str, Any]:
    return {"name": c.name, "phone": c.phone, "relation": c.relation, "tier": c.tier}


def start_context(session: Session, incident_id: int) -> dict[str, Any] | None:
    """Everything the engine needs to plan an incident, or None if there is nothing to do.

    The one-incident path (restart, retries); ``start_contexts`` gives the same contexts
    for a batch with a constant number of queries, and a test holds the two together.
    """
    inc = session.get(Incident, incident_id)
    if inc is None or inc.status != "open" or session.get(Escalation, incident_id) is not None:
        return None
    sub = session.get(Subscriber, inc.subscriber_id) if inc.subscriber_id else None
    contacts = []
    if sub is not None:
        contacts = [
            _contact(c)
            for c in session.scalars(
                select(Contact)
                .where(Contact.subscriber_id == sub.id)
                .order_by(Contact.position, Contact.id)
            )
        ]
    scopes = [(Policy.scope == "global")]
    if sub is not None:
        scopes += [
            (Policy.scope == "district") & (Policy.district == sub.district),
            (Policy.scope == "subscriber") & (Policy.subscriber_id == sub.id),
        ]
    # Ordered by id so candidates of equal scope and version are tried in a defined order,
    # the same one start_contexts uses.
    candidates = [
        _candidate(p)
        for p in session.scalars(
            select(Policy).where(Policy.active.is_(True), or_(*scopes)).order_by(Policy.id)
        )
    ]
    return _context(inc, sub, contacts, candidates)


def start_contexts(session: Session, incident_ids: list[int]) -> list[dict[str, Any]]:
    """``start_context`` for several incidents (those needing a plan), in input order.

    One query per table for up to ``MAX_IN`` incidents (incidents, escalations,
    subscribers, contacts, policies) instead of about six per incident; candidate
    policies are gathered once per distinct (district, subscriber override) scope.
    An id given twice yields one context.
    """
    ids = list(dict.fromkeys(incident_ids))
    if len(ids) > MAX_IN:
        return [
            ctx
            for at in range(0, len(ids), MAX_IN)
            for ctx in start_contexts(session, ids[at : at + MAX_IN])
        ]
    if not ids:
        return []
    incidents = {
        r.id: r
        for r in session.execute(
            select(
                Incident.id,
                Incident.status,
                Incident.kind,
                Incident.subscriber_id,
                Incident.lat,
                Incident.lon,
                Incident.created_at,
            ).where(Incident.id.in_(ids))
        )
    }
    planned = set(
        session.scalars(select(Escalation.incident_id).where(Escalation.incident_id.in_(ids)))
    )
    todo = [
        incidents[i]
        for i in ids
        if i in incidents and incidents[i].status == "open" and i not in planned
    ]
    sub_ids = sorted({r.subscriber_id for r in todo if r.subscriber_id})
    subs: dict[int, Any] = {}
    contacts: dict[int, list[dict[str, Any]]] = {}
    if sub_ids:
        subs = {
            s.id: s
            for s in session.execute(
                select(
                    Subscriber.id,
                    Subscriber.name,
                    Subscriber.address,
                    Subscriber.district,
                    Subscriber.village,
                    Subscriber.health,
                    Subscriber.disability_type,
                    Subscriber.notes,
                    Subscriber.living_situation,
                ).where(Subscriber.id.in_(sub_ids))
            )
        }
        contacts = {sid: [] for sid in subs}
        for c in session.execute(
            select(
                Contact.subscriber_id, Contact.name, Contact.phone, Contact.relation, Contact.tier
            )
            .where(Contact.subscriber_id.in_(list(subs)))
            .order_by(Contact.subscriber_id, Contact.position, Contact.id)
        ):
            contacts[c.subscriber_id].append(_contact(c))
    scopes = [(Policy.scope == "global")]
    if subs:
        scopes += [
            (Policy.scope == "district")
            & Policy.district.in_(sorted({s.district for s in subs.values()})),
            (Policy.scope == "subscriber") & Policy.subscriber_id.in_(list(subs)),
        ]
    global_: list[dict[str, Any]] = []
    by_district: dict[str, list[dict[str, Any]]] = {}
    by_subscriber: dict[int, list[dict[str, Any]]] = {}
    for p in session.execute(
        select(
            Policy.id,
            Policy.version,
            Policy.scope,
            Policy.district,
            Policy.subscriber_id,
            Policy.document,
        )
        .where(Policy.active.is_(True), or_(*scopes))
        .order_by(Policy.id)
    ):
        if p.scope == "global":
            global_.append(_candidate(p))
        elif p.scope == "district":
            by_district.setdefault(p.district, []).append(_candidate(p))
        else:
            by_subscriber.setdefault(p.subscriber_id, []).append(_candidate(p))
    # One candidate list per scope: a subscriber without an override of their own shares
    # their district's list with every neighbour in the batch.
    scoped: dict[tuple[str | None, int | None], list[dict[str, Any]]] = {}
    out = []
    for inc in todo:
        sub = subs.get(inc.subscriber_id) if inc.subscriber_id else None
        if sub is None:
            key: tuple[str | None, int | None] = (None, None)
        else:
            key = (sub.district, sub.id if sub.id in by_subscriber else None)
        candidates = scoped.get(key)
        if candidates is None:
            candidates = list(global_)
            if sub is not None:
                candidates += by_district.get(sub.district, []) + by_subscriber.get(sub.id, [])
                candidates.sort(key=lambda c: c["id"])
            scoped[key] = candidates
        out.append(_context(inc, sub, contacts.get(sub.id, []) if sub else [], candidates))
    return out


def begin_escalations(
    session: Session,
    plans: list[tuple[int, dict[str, Any] | None, dict[str, Any]]],
    now: datetime,
) -> list[tuple[int, datetime]]:
    """``begin_escalation`` for several incidents in one transaction, in bulk.

    Stores the same rows as ``begin_escalation`` plan by plan (a test compares them):
    two reads, then one INSERT each for escalations, timeline and timers and one
    executemany UPDATE of the incidents' policy, for up to ``MAX_IN`` plans.  Incidents
    already planned, closed or missing are skipped (checked again here: the read that
    planned them ran in an earlier transaction); an incident given twice is planned once.
    Returns the first timers (due now), in plan order.
    """
    if len(plans) > MAX_IN:
        return [
            t
            for at in range(0, len(plans), MAX_IN)
            for t in begin_escalations(session, plans[at : at + MAX_IN], now)
        ]
    ids = list(dict.fromkeys(incident_id for incident_id, _, _ in plans))
    if not ids:
        return []
    incidents = {
        r.id: r
        for r in session.execute(
            select(Incident.id, Incident.status, Incident.policy_id, Incident.policy_version).where(
                Incident.id.in_(ids)
            )
        )
    }
    done = set(
        session.scalars(select(Escalation.incident_id).where(Escalation.incident_id.in_(ids)))
    )
    escalations: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    timers: list[dict[str, Any]] = []
    chosen: list[dict[str, Any]] = []
    for incident_id, policy, plan in plans:
        inc = incidents.get(incident_id)
        if incident_id in done or inc is None or inc.status != "open":
            continue
        done.add(incident_id)  # a second plan for it in this batch is skipped, as one by one
        escalations.append(
            {
                "incident_id": incident_id,
                "plan": plan,
                "cursor": 0,
                "state": "running",
                "relay_confirmed": False,
                "started_at": now,
            }
        )
        if policy is not None:
            policy_id, policy_version = policy["id"], policy["version"]
            chosen.append(
                {"id": incident_id, "policy_id": policy_id, "policy_version": policy_version}
            )
        else:
            policy_id, policy_version = inc.policy_id, inc.policy_version
        entries.append(
            {
                "incident_id": incident_id,
                "at": now,
                "action": "escalation_started",
                "tier": None,
                "target": None,
                "channel": None,
                "outcome": None,
                "actor": "engine",
                "detail": {
                    "policy_id": policy_id,
                    "policy_version": policy_version,
                    "waves": len(plan["waves"]),
                },
            }
        )
        timers.append(
            {
                "incident_id": incident_id,
                "kind": "wave",
                "wave": 0,
                "due_at": now,
                "status": "pending",
                "fired_at": None,
            }
        )
    if not escalations:
        return []
    session.execute(insert(Escalation), escalations)
    if chosen:
        # One executemany by primary key: a batch may mix many policies (overrides).
        session.execute(update(Incident).execution_options(synchronize_session=False), chosen)
    session.execute(insert(TimelineEntry), entries)
    # Paired by incident, not by position: SQLite cannot promise RETURNING rows in
    # parameter order for a multi-row INSERT (SQLAlchemy would then insert row by row).
    rows = session.execute(
        insert(EscalationTimer).returning(EscalationTimer.incident_id, EscalationTimer.id), timers
    )
    timer_of = {r.incident_id: r.id for r in rows}
    return [(timer_of[t["incident_id"]], now) for t in timers]


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
    """Fire several timers in one transaction, each row still claimed exactly once.

    Stores the same rows and returns the same results as ``fire_timer`` for each id in
    turn (a test compares them), with a constant number of statements for up to
    ``MAX_IN`` timers: one UPDATE claims every row still pending (RETURNING says which),
    three reads load the timers, incidents and escalations, and the attempts, timeline
    entries and next timers are bulk inserts.  Placing the waves runs in input order on
    the loaded objects, so two timers of one incident see each other's changes.
    """
    ids = list(dict.fromkeys(timer_ids))
    if len(ids) > MAX_IN:
        return [
            f
            for at in range(0, len(ids), MAX_IN)
            for f in fire_timers(session, ids[at : at + MAX_IN], now)
        ]
    if not ids:
        return []
    # The claim: a row another transaction already fired (another engine, a retry) is not
    # returned and so not fired again.  Placing a wave never changes another pending
    # timer, so claiming the batch up front is the same as claiming each row in turn.
    claimed = set(
        session.scalars(
            update(EscalationTimer)
            .where(EscalationTimer.id.in_(ids), EscalationTimer.status == "pending")
            .values(status="done", fired_at=now)
            .returning(EscalationTimer.id)
            .execution_options(synchronize_session=False)
        )
    )
    if not claimed:
        return []
    timers = {
        t.id: t
        for t in session.scalars(select(EscalationTimer).where(EscalationTimer.id.in_(claimed)))
    }
    incident_ids = {t.incident_id for t in timers.values()}
    incidents = {
        i.id: i for i in session.scalars(select(Incident).where(Incident.id.in_(incident_ids)))
    }
    escalations = {
        e.incident_id: e
        for e in session.scalars(select(Escalation).where(Escalation.incident_id.in_(incident_ids)))
    }
    rows = _BulkRows()
    fired = [
        _fire_claimed(
            timers[t],
            incidents[timers[t].incident_id],
            escalations.get(timers[t].incident_id),
            now,
            rows,
        )
        for t in ids
        if t in claimed
    ]
    rows.write(session)
    return fired


def fire_timer(session: Session, timer_id: int, now: datetime) -> Fired | None:
    """Fire one timer: claim it, then place the wave it points at (or wait for a relay).

    The row-by-row reference for ``fire_timers``.
    """
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
    return _fire_claimed(timer, inc, esc, now, _SessionRows(session))


class _SessionRows:
    """Where a firing's new rows go when firing one timer: straight into the session."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def entry(self, incident_id: int, at: datetime, action: str, **kw: Any) -> None:
        _entry(self.session, incident_id, at, action, **kw)

    def attempt(self, row: dict[str, Any]) -> None:
        self.session.add(Attempt(**row))

    def timer(self, fired: Fired, incident_id: int, kind: str, wave: int, due: datetime) -> None:
        fired.timers.append(_timer(self.session, incident_id, kind, wave, due))


class _BulkRows:
    """Where a batch's new rows go: gathered, then one INSERT per table."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self.attempts: list[dict[str, Any]] = []
        self.timers: list[tuple[Fired, dict[str, Any]]] = []

    def entry(self, incident_id: int, at: datetime, action: str, **kw: Any) -> None:
        # Every key in every row: rows with different keys would be separate statements.
        self.entries.append(
            {
                "incident_id": incident_id,
                "at": at,
                "action": action,
                **{
                    k: kw.get(k)
                    for k in ("tier", "target", "channel", "outcome", "actor", "detail")
                },
            }
        )

    def attempt(self, row: dict[str, Any]) -> None:
        self.attempts.append(row)

    def timer(self, fired: Fired, incident_id: int, kind: str, wave: int, due: datetime) -> None:
        row = {
            "incident_id": incident_id,
            "kind": kind,
            "wave": wave,
            "due_at": due,
            "status": "pending",
            "fired_at": None,
        }
        self.timers.append((fired, row))

    def write(self, session: Session) -> None:
        """Insert everything gathered and give each new timer its id."""
        if self.attempts:
            session.execute(insert(Attempt), self.attempts)
        if self.entries:
            session.execute(insert(TimelineEntry), self.entries)
        if not self.timers:
            return
        # Paired by (incident, kind, wave), not by position: SQLite cannot promise
        # RETURNING rows in parameter order for a multi-row INSERT.
        new: dict[tuple[int, str, int], list[int]] = {}
        for r in session.execute(
            insert(EscalationTimer).returning(
                EscalationTimer.id,
                EscalationTimer.incident_id,
                EscalationTimer.kind,
                EscalationTimer.wave,
            ),
            [row for _, row in self.timers],
        ):
            new.setdefault((r.incident_id, r.kind, r.wave), []).append(r.id)
        for ids in new.values():
            ids.sort()
        for fired, row in self.timers:
            timer_id = new[(row["incident_id"], row["kind"], row["wave"])].pop(0)
            fired.timers.append((timer_id, row["due_at"]))


def _fire_claimed(
    timer: EscalationTimer,
    inc: Incident,
    esc: Escalation | None,
    now: datetime,
    rows: _SessionRows | _BulkRows,
) -> Fired:
    """What a claimed timer does: place its wave, wait for a relay decision, or nothing."""
    fired = Fired(inc.id, late=now - timer.due_at > LATE_GRACE)
    if inc.status != "open" or esc is None or esc.state in ("stopped", "exhausted"):
        return fired
    relay_ok = esc.relay_confirmed
    wave_no = timer.wave
    if timer.kind == "relay_deadline":
        if esc.state != "waiting_relay":
            return fired
        wave_no, relay_ok = esc.cursor, True
        rows.entry(
            inc.id,
            now,
            "relay_deadline_passed",
            tier="operator",
            actor="engine",
            detail={"late": fired.late},
        )
    _place_wave(rows, inc, esc, wave_no, relay_ok, now, fired)
    return fired


def _place_wave(
    rows: _SessionRows | _BulkRows,
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
        rows.entry(
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
            rows.entry(
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
            rows.timer(fired, inc.id, "relay_deadline", wave_no, deadline)
            return
    esc.state = "running"
    esc.relay_confirmed = False
    if wave["tier"] == "operator":
        rows.entry(
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
            attempt_id = secrets.token_hex(12)
            rows.attempt(
                {
                    "id": attempt_id,
                    "incident_id": inc.id,
                    "wave": wave_no,
                    "tier": wave["tier"],
                    "channel": channel,
                    "target_name": target["name"],
                    "phone": target["phone"],
                    "status": "calling",
                    "created_at": now,
                    "answered_at": None,
                }
            )
            rows.entry(
                inc.id,
                now,
                "relay" if channel == "relay" else "notify",
                tier=wave["tier"],
                target=f"{target['name']} {target['phone']}",
                channel=channel,
                outcome="sent",
                actor="engine",
                detail={"attempt": attempt_id, "relation": target.get("relation"), **late},
            )
            fired.attempts.append(
                {
                    "id": attempt_id,
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
    rows.timer(fired, inc.id, "wave", wave_no + 1, now + timedelta(seconds=wave["wait_s"]))


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
