"""Subscriber repository: enrollment, contacts, device binding, de-registration."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from dispatch.store.errors import Conflict, NotFound
from dispatch.store.models import Contact, Device, EventLog, Subscriber

# Plain columns a client may set at creation and change with PATCH.
FIELDS = (
    "name",
    "district",
    "address",
    "phone",
    "id_number",
    "township",
    "village",
    "living_situation",
    "health",
    "disability_type",
    "notes",
)


def _contacts(contacts: list[dict[str, Any]]) -> list[Contact]:
    return [
        Contact(
            position=n,
            name=c["name"],
            phone=c["phone"],
            relation=c.get("relation"),
            tier=c.get("tier", "family"),
        )
        for n, c in enumerate(contacts)
    ]


def _bind_device(session: Session, sub: Subscriber, device: dict[str, Any], now: datetime) -> None:
    existing = session.scalar(select(Device).where(Device.ident == device["ident"]))
    if existing is not None and existing.subscriber_id not in (None, sub.id):
        raise Conflict(f"device {device['ident']} is bound to another subscriber")
    for old in list(sub.devices):
        if old.ident != device["ident"]:
            old.subscriber_id = None
    if existing is None:
        existing = Device(ident=device["ident"], protocol=device["protocol"], created_at=now)
        session.add(existing)
    existing.protocol = device["protocol"]
    existing.subscriber = sub


def create_subscriber(session: Session, data: dict[str, Any], now: datetime) -> int:
    """Insert a subscriber with contacts and device; returns the new id."""
    sub = Subscriber(
        **{k: data.get(k) for k in FIELDS}, status="active", created_at=now, updated_at=now
    )
    sub.contacts = _contacts(data.get("contacts", []))
    session.add(sub)
    session.flush()
    if data.get("device"):
        _bind_device(session, sub, data["device"], now)
    session.add(
        EventLog(
            at=now, kind="subscriber_created", subscriber_id=sub.id, data={"district": sub.district}
        )
    )
    session.flush()
    return sub.id


def _load(session: Session, subscriber_id: int) -> Subscriber:
    sub = session.scalar(
        select(Subscriber)
        .where(Subscriber.id == subscriber_id)
        .options(selectinload(Subscriber.contacts), selectinload(Subscriber.devices))
    )
    if sub is None:
        raise NotFound(f"subscriber {subscriber_id} does not exist")
    return sub


def subscriber_dict(sub: Subscriber) -> dict[str, Any]:
    """The API shape of a subscriber."""
    device = sub.devices[0] if sub.devices else None
    return {
        "id": sub.id,
        **{k: getattr(sub, k) for k in FIELDS},
        "status": sub.status,
        "deregistered_at": sub.deregistered_at.isoformat() if sub.deregistered_at else None,
        "deregistration_reason": sub.deregistration_reason,
        "created_at": sub.created_at.isoformat(),
        "updated_at": sub.updated_at.isoformat(),
        "contacts": [
            {"name": c.name, "phone": c.phone, "relation": c.relation, "tier": c.tier}
            for c in sub.contacts
        ],
        "device": {"protocol": device.protocol, "ident": device.ident} if device else None,
    }


def get_subscriber(session: Session, subscriber_id: int) -> dict[str, Any]:
    """One subscriber with contacts and device."""
    return subscriber_dict(_load(session, subscriber_id))


def list_subscribers(
    session: Session, district: str | None, status: str | None, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    """A page of subscribers and the total that match."""
    q = select(Subscriber)
    if district:
        q = q.where(Subscriber.district == district)
    if status:
        q = q.where(Subscriber.status == status)
    total = session.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = session.scalars(
        q.order_by(Subscriber.id)
        .limit(limit)
        .offset(offset)
        .options(selectinload(Subscriber.contacts), selectinload(Subscriber.devices))
    )
    return [subscriber_dict(s) for s in rows], total


def update_subscriber(
    session: Session, subscriber_id: int, changes: dict[str, Any], now: datetime
) -> dict[str, Any]:
    """Apply a PATCH: plain fields, a full replacement contact list, a device rebind."""
    sub = _load(session, subscriber_id)
    if sub.status != "active":
        raise Conflict(f"subscriber {subscriber_id} is de-registered")
    for key in FIELDS:
        if key in changes:
            setattr(sub, key, changes[key])
    if "contacts" in changes:
        sub.contacts = _contacts(changes["contacts"])
    if changes.get("device"):
        _bind_device(session, sub, changes["device"], now)
    sub.updated_at = now
    session.add(
        EventLog(
            at=now,
            kind="subscriber_updated",
            subscriber_id=sub.id,
            data={"fields": sorted(changes)},
        )
    )
    session.flush()
    session.refresh(sub)
    return subscriber_dict(sub)


def deregister_subscriber(
    session: Session, subscriber_id: int, reason: str, now: datetime
) -> dict[str, Any]:
    """Mark a subscriber de-registered and free the device; the record is kept for audit."""
    sub = _load(session, subscriber_id)
    if sub.status != "active":
        raise Conflict(f"subscriber {subscriber_id} is already de-registered")
    sub.status = "deregistered"
    sub.deregistered_at = now
    sub.deregistration_reason = reason
    sub.updated_at = now
    idents = [d.ident for d in sub.devices]
    for device in list(sub.devices):
        device.subscriber_id = None
    session.add(
        EventLog(
            at=now,
            kind="subscriber_deregistered",
            subscriber_id=sub.id,
            data={"reason": reason, "devices": idents},
        )
    )
    session.flush()
    session.expire(sub)
    return subscriber_dict(_load(session, subscriber_id))
