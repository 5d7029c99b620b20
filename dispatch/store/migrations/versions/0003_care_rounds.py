"""care rounds

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import dispatch.store.types

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "care_plans",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("scope", sa.String(length=20), nullable=False),
        sa.Column("district", sa.String(length=50), nullable=True),
        sa.Column("subscriber_id", sa.BigInteger(), nullable=True),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("updated_at", dispatch.store.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=100), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_care_plans")),
        sa.UniqueConstraint("subscriber_id", name=op.f("uq_care_plans_subscriber_id")),
    )
    with op.batch_alter_table("care_plans", schema=None) as batch_op:
        batch_op.create_index("ix_care_plans_scope_district", ["scope", "district"], unique=False)

    op.create_table(
        "care_rounds",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "subscriber_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("district", sa.String(length=50), nullable=False),
        sa.Column("due_at", dispatch.store.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column(
            "next_action_at", dispatch.store.types.UtcDateTime(timezone=True), nullable=False
        ),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("channel", sa.String(length=20), nullable=True),
        sa.Column("answer", sa.String(length=20), nullable=True),
        sa.Column("reason", sa.String(length=30), nullable=True),
        sa.Column("prompted_at", dispatch.store.types.UtcDateTime(timezone=True), nullable=True),
        sa.Column("answered_at", dispatch.store.types.UtcDateTime(timezone=True), nullable=True),
        sa.Column("late", sa.Boolean(), nullable=False),
        sa.Column("incident_id", sa.BigInteger(), nullable=True),
        sa.Column("callback_token", sa.String(length=40), nullable=True),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["subscriber_id"],
            ["subscribers.id"],
            name=op.f("fk_care_rounds_subscriber_id_subscribers"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_care_rounds")),
        sa.UniqueConstraint("callback_token", name=op.f("uq_care_rounds_callback_token")),
    )
    with op.batch_alter_table("care_rounds", schema=None) as batch_op:
        batch_op.create_index("ix_care_rounds_district_due", ["district", "due_at"], unique=False)
        batch_op.create_index(
            "ix_care_rounds_status_next", ["status", "next_action_at"], unique=False
        )
        batch_op.create_index(
            "ix_care_rounds_subscriber_due", ["subscriber_id", "due_at"], unique=False
        )

    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.create_index("ix_devices_online_last_seen", ["online", "last_seen"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_index("ix_devices_online_last_seen")

    with op.batch_alter_table("care_rounds", schema=None) as batch_op:
        batch_op.drop_index("ix_care_rounds_subscriber_due")
        batch_op.drop_index("ix_care_rounds_status_next")
        batch_op.drop_index("ix_care_rounds_district_due")

    op.drop_table("care_rounds")
    with op.batch_alter_table("care_plans", schema=None) as batch_op:
        batch_op.drop_index("ix_care_plans_scope_district")

    op.drop_table("care_plans")
