"""notifications: channels, subscriptions, the outbox of events and their deliveries

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30

Generated, then read and corrected by hand. Four new tables, nothing existing changes. The
deliveries and subscriptions of a channel go with it (ON DELETE CASCADE; SQLite enforces it, the
engine turns ``foreign_keys`` on), and so do an event's deliveries.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "notification_channel",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("config", sa.Text(), nullable=False, comment="JSON of the non-secret settings"),
        sa.Column("secret", sa.Text(), nullable=True, comment="Never returned by the API"),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("user_selectable", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "kind IN ('webhook', 'slack', 'email')", name=op.f("ck_notification_channel_kind")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notification_channel")),
        sa.UniqueConstraint("name", name=op.f("uq_notification_channel_name")),
    )
    op.create_table(
        "notification_event",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False, comment="JSON"),
        sa.Column("subject_user_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notification_event")),
    )
    with op.batch_alter_table("notification_event", schema=None) as batch_op:
        batch_op.create_index("ix_notification_event_created_at", ["created_at"], unique=False)
        batch_op.create_index(
            "ix_notification_event_state_next_attempt_at",
            ["state", "next_attempt_at"],
            unique=False,
        )

    op.create_table(
        "notification_delivery",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("event_id", sa.String(length=255), nullable=False),
        sa.Column("channel_id", sa.String(length=32), nullable=False),
        sa.Column("recipient", sa.String(length=254), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claim_token", sa.String(length=32), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["channel_id"],
            ["notification_channel.id"],
            name=op.f("fk_notification_delivery_channel_id_notification_channel"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["notification_event.id"],
            name=op.f("fk_notification_delivery_event_id_notification_event"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notification_delivery")),
        sa.UniqueConstraint(
            "event_id", "channel_id", "recipient", name="uq_notification_delivery_key"
        ),
    )
    with op.batch_alter_table("notification_delivery", schema=None) as batch_op:
        batch_op.create_index("ix_notification_delivery_channel_id", ["channel_id"], unique=False)
        batch_op.create_index("ix_notification_delivery_claim_token", ["claim_token"], unique=False)
        batch_op.create_index(
            "ix_notification_delivery_state_next_attempt_at",
            ["state", "next_attempt_at"],
            unique=False,
        )

    op.create_table(
        "notification_subscription",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("channel_id", sa.String(length=32), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("event_kind", sa.String(length=64), nullable=False),
        sa.Column("recipient", sa.String(length=254), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["channel_id"],
            ["notification_channel.id"],
            name=op.f("fk_notification_subscription_channel_id_notification_channel"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notification_subscription")),
        sa.UniqueConstraint(
            "channel_id",
            "user_id",
            "event_kind",
            "recipient",
            name="uq_notification_subscription_key",
        ),
    )
    with op.batch_alter_table("notification_subscription", schema=None) as batch_op:
        batch_op.create_index("ix_notification_subscription_user_id", ["user_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("notification_subscription", schema=None) as batch_op:
        batch_op.drop_index("ix_notification_subscription_user_id")

    op.drop_table("notification_subscription")
    with op.batch_alter_table("notification_delivery", schema=None) as batch_op:
        batch_op.drop_index("ix_notification_delivery_state_next_attempt_at")
        batch_op.drop_index("ix_notification_delivery_claim_token")
        batch_op.drop_index("ix_notification_delivery_channel_id")

    op.drop_table("notification_delivery")
    with op.batch_alter_table("notification_event", schema=None) as batch_op:
        batch_op.drop_index("ix_notification_event_state_next_attempt_at")
        batch_op.drop_index("ix_notification_event_created_at")

    op.drop_table("notification_event")
    op.drop_table("notification_channel")
