"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import dispatch.store.types

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=20), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=True),
        sa.Column("district", sa.String(length=50), nullable=True),
        sa.Column("created_at", dispatch.store.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", dispatch.store.types.UtcDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    op.create_table(
        "event_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("at", dispatch.store.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("device_ident", sa.String(length=32), nullable=True),
        sa.Column("subscriber_id", sa.BigInteger(), nullable=True),
        sa.Column("incident_id", sa.BigInteger(), nullable=True),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_log")),
    )
    with op.batch_alter_table("event_log", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_event_log_at"), ["at"], unique=False)

    op.create_table(
        "subscribers",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("district", sa.String(length=50), nullable=False),
        sa.Column("address", sa.String(length=300), nullable=False),
        sa.Column("phone", sa.String(length=30), nullable=True),
        sa.Column("id_number", sa.String(length=30), nullable=True),
        sa.Column("township", sa.String(length=100), nullable=True),
        sa.Column("village", sa.String(length=100), nullable=True),
        sa.Column("living_situation", sa.String(length=30), nullable=True),
        sa.Column("health", sa.String(length=30), nullable=True),
        sa.Column("disability_type", sa.String(length=30), nullable=True),
        sa.Column("notes", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column(
            "deregistered_at", dispatch.store.types.UtcDateTime(timezone=True), nullable=True
        ),
        sa.Column("deregistration_reason", sa.String(length=200), nullable=True),
        sa.Column("created_at", dispatch.store.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", dispatch.store.types.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subscribers")),
    )
    with op.batch_alter_table("subscribers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_subscribers_district"), ["district"], unique=False)

    op.create_table(
        "contacts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "subscriber_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("phone", sa.String(length=30), nullable=False),
        sa.Column("relation", sa.String(length=50), nullable=True),
        sa.Column("tier", sa.String(length=20), nullable=False),
        sa.ForeignKeyConstraint(
            ["subscriber_id"],
            ["subscribers.id"],
            name=op.f("fk_contacts_subscriber_id_subscribers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_contacts")),
    )
    with op.batch_alter_table("contacts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_contacts_subscriber_id"), ["subscriber_id"], unique=False
        )

    op.create_table(
        "devices",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("ident", sa.String(length=32), nullable=False),
        sa.Column("protocol", sa.String(length=10), nullable=False),
        sa.Column(
            "subscriber_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("last_seen", dispatch.store.types.UtcDateTime(timezone=True), nullable=True),
        sa.Column("battery", sa.Integer(), nullable=True),
        sa.Column("signal", sa.Integer(), nullable=True),
        sa.Column("charging", sa.Boolean(), nullable=True),
        sa.Column("firmware", sa.String(length=64), nullable=True),
        sa.Column("protocol_version", sa.Integer(), nullable=True),
        sa.Column("auth_code", sa.String(length=64), nullable=True),
        sa.Column("lat", sa.Float(), nullable=True),
        sa.Column("lon", sa.Float(), nullable=True),
        sa.Column("created_at", dispatch.store.types.UtcDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["subscriber_id"],
            ["subscribers.id"],
            name=op.f("fk_devices_subscriber_id_subscribers"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")),
        sa.UniqueConstraint("ident", name=op.f("uq_devices_ident")),
    )
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_devices_subscriber_id"), ["subscriber_id"], unique=False
        )

    op.create_table(
        "incidents",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column(
            "subscriber_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("device_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("device_ident", sa.String(length=32), nullable=True),
        sa.Column("lat", sa.Float(), nullable=True),
        sa.Column("lon", sa.Float(), nullable=True),
        sa.Column("accuracy_m", sa.Integer(), nullable=True),
        sa.Column("outcome", sa.String(length=30), nullable=True),
        sa.Column("claimed_by", sa.String(length=100), nullable=True),
        sa.Column("created_at", dispatch.store.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", dispatch.store.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column(
            "acknowledged_at", dispatch.store.types.UtcDateTime(timezone=True), nullable=True
        ),
        sa.Column("resolved_at", dispatch.store.types.UtcDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_incidents_device_id_devices")
        ),
        sa.ForeignKeyConstraint(
            ["subscriber_id"],
            ["subscribers.id"],
            name=op.f("fk_incidents_subscriber_id_subscribers"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_incidents")),
    )
    with op.batch_alter_table("incidents", schema=None) as batch_op:
        batch_op.create_index("ix_incidents_device_status", ["device_id", "status"], unique=False)
        batch_op.create_index(
            "ix_incidents_status_priority", ["status", "priority", "created_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_incidents_subscriber_id"), ["subscriber_id"], unique=False
        )

    op.create_table(
        "incident_timeline",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "incident_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("at", dispatch.store.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column("action", sa.String(length=40), nullable=False),
        sa.Column("tier", sa.String(length=20), nullable=True),
        sa.Column("target", sa.String(length=100), nullable=True),
        sa.Column("channel", sa.String(length=20), nullable=True),
        sa.Column("outcome", sa.String(length=30), nullable=True),
        sa.Column("actor", sa.String(length=100), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["incident_id"],
            ["incidents.id"],
            name=op.f("fk_incident_timeline_incident_id_incidents"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_incident_timeline")),
    )
    with op.batch_alter_table("incident_timeline", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_incident_timeline_incident_id"), ["incident_id"], unique=False
        )

    op.create_table(
        "sos_frames",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "device_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("terminal_time", sa.BigInteger(), nullable=True),
        sa.Column("received_at", dispatch.store.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column(
            "incident_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_sos_frames_device_id_devices")
        ),
        sa.ForeignKeyConstraint(
            ["incident_id"], ["incidents.id"], name=op.f("fk_sos_frames_incident_id_incidents")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sos_frames")),
    )
    with op.batch_alter_table("sos_frames", schema=None) as batch_op:
        batch_op.create_index(
            "ix_sos_frames_device_seq", ["device_id", "seq", "received_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("sos_frames", schema=None) as batch_op:
        batch_op.drop_index("ix_sos_frames_device_seq")

    op.drop_table("sos_frames")
    with op.batch_alter_table("incident_timeline", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_incident_timeline_incident_id"))

    op.drop_table("incident_timeline")
    with op.batch_alter_table("incidents", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_incidents_subscriber_id"))
        batch_op.drop_index("ix_incidents_status_priority")
        batch_op.drop_index("ix_incidents_device_status")

    op.drop_table("incidents")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_devices_subscriber_id"))

    op.drop_table("devices")
    with op.batch_alter_table("contacts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_contacts_subscriber_id"))

    op.drop_table("contacts")
    with op.batch_alter_table("subscribers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_subscribers_district"))

    op.drop_table("subscribers")
    with op.batch_alter_table("event_log", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_event_log_at"))

    op.drop_table("event_log")
    op.drop_table("api_tokens")
