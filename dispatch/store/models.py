"""SQLAlchemy models: the schema of record.

Alembic migrations in ``migrations/versions`` create this schema; a test
checks the two agree.  Times are stored as timezone-aware UTC.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from dispatch.store.types import UtcDateTime

# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets BIGINT identity.
BigId = BigInteger().with_variant(Integer, "sqlite")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base with deterministic constraint names (migrations rely on them)."""

    metadata = MetaData(naming_convention=NAMING)


class Subscriber(Base):
    """A person served: aged 80+ or with a grade 1/2 disability."""

    __tablename__ = "subscribers"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    district: Mapped[str] = mapped_column(String(50), index=True)
    address: Mapped[str] = mapped_column(String(300))
    phone: Mapped[str | None] = mapped_column(String(30))
    id_number: Mapped[str | None] = mapped_column(String(30))
    township: Mapped[str | None] = mapped_column(String(100))
    village: Mapped[str | None] = mapped_column(String(100))
    living_situation: Mapped[str | None] = mapped_column(String(30))
    health: Mapped[str | None] = mapped_column(String(30))
    disability_type: Mapped[str | None] = mapped_column(String(30))
    notes: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20), default="active")
    deregistered_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    deregistration_reason: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())

    contacts: Mapped[list[Contact]] = relationship(
        back_populates="subscriber", order_by="Contact.position", cascade="all, delete-orphan"
    )
    devices: Mapped[list[Device]] = relationship(back_populates="subscriber")


class Contact(Base):
    """Someone in the subscriber's help network, in calling order."""

    __tablename__ = "contacts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    subscriber_id: Mapped[int] = mapped_column(
        ForeignKey("subscribers.id", ondelete="CASCADE"), index=True
    )
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(100))
    phone: Mapped[str] = mapped_column(String(30))
    relation: Mapped[str | None] = mapped_column(String(50))
    tier: Mapped[str] = mapped_column(String(20), default="family")

    subscriber: Mapped[Subscriber] = relationship(back_populates="contacts")


class Device(Base):
    """A terminal bound to a subscriber; live fields are flushed in batches."""

    __tablename__ = "devices"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    ident: Mapped[str] = mapped_column(String(32), unique=True)
    protocol: Mapped[str] = mapped_column(String(10))
    subscriber_id: Mapped[int | None] = mapped_column(
        ForeignKey("subscribers.id", ondelete="SET NULL"), index=True
    )
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seen: Mapped[datetime | None] = mapped_column(UtcDateTime())
    battery: Mapped[int | None] = mapped_column(Integer)
    signal: Mapped[int | None] = mapped_column(Integer)
    charging: Mapped[bool | None] = mapped_column(Boolean)
    firmware: Mapped[str | None] = mapped_column(String(64))
    protocol_version: Mapped[int | None] = mapped_column(Integer)
    auth_code: Mapped[str | None] = mapped_column(String(64))
    lat: Mapped[float | None] = mapped_column(Float)
    lon: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())

    subscriber: Mapped[Subscriber | None] = relationship(back_populates="devices")

    __table_args__ = (Index("ix_devices_online_last_seen", "online", "last_seen"),)


class Incident(Base):
    """Something that needs a human: an SOS, a fall, a missed care check, a silent terminal."""

    __tablename__ = "incidents"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20), default="open")
    priority: Mapped[int] = mapped_column(Integer)
    subscriber_id: Mapped[int | None] = mapped_column(ForeignKey("subscribers.id"), index=True)
    device_id: Mapped[int | None] = mapped_column(ForeignKey("devices.id"))
    device_ident: Mapped[str | None] = mapped_column(String(32))
    lat: Mapped[float | None] = mapped_column(Float)
    lon: Mapped[float | None] = mapped_column(Float)
    accuracy_m: Mapped[int | None] = mapped_column(Integer)
    outcome: Mapped[str | None] = mapped_column(String(30))
    claimed_by: Mapped[str | None] = mapped_column(String(100))
    acknowledged_by: Mapped[str | None] = mapped_column(String(100))
    acknowledged_tier: Mapped[str | None] = mapped_column(String(20))
    policy_id: Mapped[int | None] = mapped_column(BigInteger)
    policy_version: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
    acknowledged_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    resolved_at: Mapped[datetime | None] = mapped_column(UtcDateTime())

    timeline: Mapped[list[TimelineEntry]] = relationship(
        back_populates="incident", order_by="TimelineEntry.id"
    )

    __table_args__ = (
        Index("ix_incidents_status_priority", "status", "priority", "created_at"),
        Index("ix_incidents_device_status", "device_id", "status"),
    )


class TimelineEntry(Base):
    """One thing that happened to an incident: an alarm, an attempt, an operator action."""

    __tablename__ = "incident_timeline"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    incident_id: Mapped[int] = mapped_column(ForeignKey("incidents.id"), index=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    action: Mapped[str] = mapped_column(String(40))
    tier: Mapped[str | None] = mapped_column(String(20))
    target: Mapped[str | None] = mapped_column(String(100))
    channel: Mapped[str | None] = mapped_column(String(20))
    outcome: Mapped[str | None] = mapped_column(String(30))
    actor: Mapped[str | None] = mapped_column(String(100))
    detail: Mapped[dict | None] = mapped_column(JSON)

    incident: Mapped[Incident] = relationship(back_populates="timeline")


class SosFrame(Base):
    """Every distinct SOS frame received: the key for deduplicating retransmissions."""

    __tablename__ = "sos_frames"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id"))
    seq: Mapped[int] = mapped_column(BigInteger)
    terminal_time: Mapped[int | None] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime())
    incident_id: Mapped[int] = mapped_column(ForeignKey("incidents.id"))

    __table_args__ = (Index("ix_sos_frames_device_seq", "device_id", "seq", "received_at"),)


class EventLog(Base):
    """Append-only record of what terminals and people did; never updated or deleted."""

    __tablename__ = "event_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)
    kind: Mapped[str] = mapped_column(String(40))
    device_ident: Mapped[str | None] = mapped_column(String(32))
    subscriber_id: Mapped[int | None] = mapped_column(BigInteger)
    incident_id: Mapped[int | None] = mapped_column(BigInteger)
    data: Mapped[dict | None] = mapped_column(JSON)


class ApiToken(Base):
    """A bearer token; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(20))
    name: Mapped[str | None] = mapped_column(String(100))
    district: Mapped[str | None] = mapped_column(String(50))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class Policy(Base):
    """One version of an escalation policy; editing inserts a new version."""

    __tablename__ = "policies"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    scope: Mapped[str] = mapped_column(String(20))  # global, district, subscriber
    district: Mapped[str | None] = mapped_column(String(50))
    subscriber_id: Mapped[int | None] = mapped_column(BigInteger)
    version: Mapped[int] = mapped_column(Integer)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    document: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    created_by: Mapped[str | None] = mapped_column(String(100))

    __table_args__ = (Index("ix_policies_scope_active", "scope", "active"),)


class Escalation(Base):
    """The concrete plan an incident runs, and how far it has got."""

    __tablename__ = "escalations"

    incident_id: Mapped[int] = mapped_column(ForeignKey("incidents.id"), primary_key=True)
    plan: Mapped[dict] = mapped_column(JSON)
    cursor: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(20))  # running, waiting_relay, stopped, exhausted
    relay_confirmed: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime())


class EscalationTimer(Base):
    """A step that is due at a time; durable so a restart neither forgets nor repeats it."""

    __tablename__ = "escalation_timers"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    incident_id: Mapped[int] = mapped_column(ForeignKey("incidents.id"), index=True)
    kind: Mapped[str] = mapped_column(String(20))  # wave, relay_deadline
    wave: Mapped[int] = mapped_column(Integer)
    due_at: Mapped[datetime] = mapped_column(UtcDateTime())
    status: Mapped[str] = mapped_column(String(20), default="pending")
    fired_at: Mapped[datetime | None] = mapped_column(UtcDateTime())

    __table_args__ = (Index("ix_escalation_timers_status_due", "status", "due_at"),)


class Attempt(Base):
    """One call, message or relay to one target, and how it ended."""

    __tablename__ = "attempts"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    incident_id: Mapped[int] = mapped_column(ForeignKey("incidents.id"), index=True)
    wave: Mapped[int] = mapped_column(Integer)
    tier: Mapped[str] = mapped_column(String(20))
    channel: Mapped[str] = mapped_column(String(20))
    target_name: Mapped[str | None] = mapped_column(String(100))
    phone: Mapped[str] = mapped_column(String(30))
    status: Mapped[str] = mapped_column(String(20))  # calling, accepted, declined, ...
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    answered_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class CarePlanOverride(Base):
    """A care-plan document for one subscriber or one district's default."""

    __tablename__ = "care_plans"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    scope: Mapped[str] = mapped_column(String(20))  # district, subscriber
    district: Mapped[str | None] = mapped_column(String(50))
    subscriber_id: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    document: Mapped[dict] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_by: Mapped[str | None] = mapped_column(String(100))

    __table_args__ = (Index("ix_care_plans_scope_district", "scope", "district"),)


class CareRound(Base):
    """One care check of one subscriber: due, prompted, answered, retried or missed."""

    __tablename__ = "care_rounds"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    subscriber_id: Mapped[int] = mapped_column(ForeignKey("subscribers.id"))
    district: Mapped[str] = mapped_column(String(50))
    due_at: Mapped[datetime] = mapped_column(UtcDateTime())
    next_action_at: Mapped[datetime] = mapped_column(UtcDateTime())
    status: Mapped[str] = mapped_column(String(20))  # scheduled prompted answered missed ...
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    channel: Mapped[str | None] = mapped_column(String(20))  # terminal, voice
    answer: Mapped[str | None] = mapped_column(String(20))
    reason: Mapped[str | None] = mapped_column(String(30))  # schedule, inactivity
    prompted_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    answered_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    late: Mapped[bool] = mapped_column(Boolean, default=False)
    incident_id: Mapped[int | None] = mapped_column(BigInteger)
    callback_token: Mapped[str | None] = mapped_column(String(40), unique=True)
    params: Mapped[dict] = mapped_column(JSON)  # answer window, retries, spacing

    __table_args__ = (
        Index("ix_care_rounds_status_next", "status", "next_action_at"),
        Index("ix_care_rounds_subscriber_due", "subscriber_id", "due_at"),
        Index("ix_care_rounds_district_due", "district", "due_at"),
    )
