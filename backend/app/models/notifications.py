"""Notification tables: channels, subscriptions, the outbox of events and their deliveries.

The schema is Alembic's (``alembic/versions/0007_notifications.py``); the rules are
``app.notifications``'s.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, new_id, utcnow

CHANNEL_KINDS = ("webhook", "slack", "email")
# The id of an event is its deduplication key (``budget.soft_threshold:user_daily:alice:...``).
EVENT_ID_MAX_CHARS = 255


class NotificationChannel(Base):
    """Where notifications go: a signed webhook, a Slack incoming webhook or an SMTP mailbox.

    ``config`` is the JSON of the channel's non-secret settings (the webhook URL, the SMTP host
    and recipients); ``secret`` is what is never shown after creation (the webhook's signing
    secret, the Slack webhook URL, which is itself a credential, the SMTP password).
    ``user_selectable``: users may subscribe their own events to it.
    """

    __tablename__ = "notification_channel"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    config: Mapped[str] = mapped_column(Text, comment="JSON of the non-secret settings")
    secret: Mapped[str | None] = mapped_column(Text, comment="Never returned by the API")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    user_selectable: Mapped[bool] = mapped_column(Boolean, default=False)
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (CheckConstraint("kind IN ('webhook', 'slack', 'email')", name="kind"),)


class NotificationSubscription(Base):
    """A channel subscribed to one kind of event (``*``: every kind).

    ``user_id`` is whose events: '' for everyone's (administrators only), else one user's (a
    user's own subscriptions have their id). ``recipient`` is an e-mail channel's address for
    this subscription ('' = the channel's own recipients).
    """

    __tablename__ = "notification_subscription"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    channel_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("notification_channel.id", ondelete="CASCADE")
    )
    user_id: Mapped[str] = mapped_column(String(64), default="")
    event_kind: Mapped[str] = mapped_column(String(64))
    recipient: Mapped[str] = mapped_column(String(254), default="")
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (
        UniqueConstraint(
            "channel_id",
            "user_id",
            "event_kind",
            "recipient",
            name="uq_notification_subscription_key",
        ),
        Index("ix_notification_subscription_user_id", "user_id"),
    )


class NotificationEvent(Base):
    """The outbox: one row per event, written in the transaction of the fact that caused it.

    ``id`` is the event's deduplication key (a threshold's scope, subject and window; a task's
    id), so recording the same fact twice is one row. ``state``: ``pending`` until the
    dispatcher has made its deliveries (``dispatched``) or found no subscription (``dropped``);
    ``attempts``, ``next_attempt_at`` and ``last_error`` belong to that fan-out.
    """

    __tablename__ = "notification_event"

    id: Mapped[str] = mapped_column(String(EVENT_ID_MAX_CHARS), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(Text, comment="JSON")
    subject_user_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_notification_event_state_next_attempt_at", "state", "next_attempt_at"),
        Index("ix_notification_event_created_at", "created_at"),
    )


class NotificationDelivery(Base):
    """One event to one channel (and recipient): retried with backoff, dead after N tries.

    ``state``: ``pending`` (due at ``next_attempt_at``), ``sending`` (claimed by a dispatcher
    until ``next_attempt_at``, its lease: a dispatcher that died leaves it due again),
    ``delivered`` or ``dead``. ``claim_token`` names the claim that sends it now.
    """

    __tablename__ = "notification_delivery"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    event_id: Mapped[str] = mapped_column(
        String(EVENT_ID_MAX_CHARS), ForeignKey("notification_event.id", ondelete="CASCADE")
    )
    channel_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("notification_channel.id", ondelete="CASCADE")
    )
    recipient: Mapped[str] = mapped_column(String(254), default="")
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    claim_token: Mapped[str | None] = mapped_column(String(32))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint(
            "event_id", "channel_id", "recipient", name="uq_notification_delivery_key"
        ),
        Index("ix_notification_delivery_state_next_attempt_at", "state", "next_attempt_at"),
        Index("ix_notification_delivery_channel_id", "channel_id"),
        Index("ix_notification_delivery_claim_token", "claim_token"),
    )
