"""The rules of ``/api/v1/notifications``: who manages what, and the shape of each answer.

Administrators manage channels (a channel's URL, SMTP server and secrets are theirs to set),
every subscription and the dead letters. A user sees the channels administrators made
``user_selectable`` (their name and kind only) and manages the subscriptions of their own
events; another user's subscription is answered as if it did not exist (404).
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy.orm import Session

from app.access.principal import Principal
from app.core.config import Settings
from app.core.errors import Conflict, Forbidden, InvalidInput, NotFound
from app.models import (
    NotificationChannel,
    NotificationDelivery,
    NotificationSubscription,
    new_id,
)
from app.notifications import store
from app.notifications.channels import DeliveryFailed, Sender, stored_target
from app.notifications.events import channel_test_event, dumps
from app.schemas.notifications import (
    ChannelCreate,
    ChannelCreated,
    ChannelList,
    ChannelOut,
    ChannelUpdate,
    DeadLetter,
    DeadLetterList,
    DeliveryOut,
    SubscriptionCreate,
    SubscriptionList,
    SubscriptionOut,
    TestResult,
)

# -- channels ----------------------------------------------------------------------------------


def _channel_out(row: NotificationChannel, principal: Principal) -> dict[str, Any]:
    admin = principal.is_admin
    return {
        "id": row.id,
        "name": row.name,
        "kind": row.kind,
        "enabled": row.enabled,
        "user_selectable": row.user_selectable,
        "created_at": store.as_utc(row.created_at),
        "created_by": row.created_by if admin else None,
        "config": json.loads(row.config) if admin else None,
        "has_secret": bool(row.secret),
    }


def _visible_channel(
    session: Session, principal: Principal, channel_id: str
) -> NotificationChannel:
    row = store.get_channel(session, channel_id)
    if row is None or not (principal.is_admin or (row.user_selectable and row.enabled)):
        raise NotFound(f"Channel {channel_id} not found")
    return row


def create_channel(session: Session, principal: Principal, body: ChannelCreate) -> ChannelCreated:
    if store.channel_name_taken(session, body.name):
        raise Conflict(f"A channel named {body.name!r} exists already")
    target = stored_target(body.target)
    row = store.insert_channel(
        session,
        NotificationChannel(
            id=new_id(),
            name=body.name,
            kind=body.target.kind,
            config=json.dumps(target.config),
            secret=target.secret,
            enabled=body.enabled,
            user_selectable=body.user_selectable,
            created_by=principal.user_id,
            created_at=store.utcnow(),
        ),
    )
    return ChannelCreated(**_channel_out(row, principal), signing_secret=target.show_once)


def list_channels(session: Session, principal: Principal) -> ChannelList:
    rows = store.list_channels(session, selectable_only=not principal.is_admin)
    return ChannelList(items=[ChannelOut(**_channel_out(r, principal)) for r in rows])


def get_channel(session: Session, principal: Principal, channel_id: str) -> ChannelOut:
    return ChannelOut(**_channel_out(_visible_channel(session, principal, channel_id), principal))


def update_channel(
    session: Session, principal: Principal, channel_id: str, body: ChannelUpdate
) -> ChannelOut:
    row = _visible_channel(session, principal, channel_id)
    if body.name is not None and body.name != row.name:
        if store.channel_name_taken(session, body.name, except_id=row.id):
            raise Conflict(f"A channel named {body.name!r} exists already")
        row.name = body.name
    if body.enabled is not None:
        row.enabled = body.enabled
    if body.user_selectable is not None:
        row.user_selectable = body.user_selectable
    session.flush()
    return ChannelOut(**_channel_out(row, principal))


def delete_channel(session: Session, principal: Principal, channel_id: str) -> None:
    """The channel, its subscriptions and its deliveries (dead letters included)."""
    store.delete_channel(session, _visible_channel(session, principal, channel_id))


def send_test(
    session: Session, settings: Settings, principal: Principal, channel_id: str
) -> TestResult:
    """Send a test event over the channel now (not through the outbox) and say how it went."""
    row = _visible_channel(session, principal, channel_id)
    channel = store.channel_of(row)
    event = channel_test_event(channel.name, principal.user_id)
    sender = Sender(settings.notification_send_timeout_seconds)
    try:
        sender.send(channel, dumps(event.body()))
    except DeliveryFailed as exc:
        return TestResult(delivered=False, event_id=event.id, error=str(exc) or "failed")
    finally:
        sender.close()
    return TestResult(delivered=True, event_id=event.id, error=None)


# -- subscriptions -----------------------------------------------------------------------------


def _subscription_out(row: NotificationSubscription, channel_name: str) -> SubscriptionOut:
    return SubscriptionOut(
        id=row.id,
        channel_id=row.channel_id,
        channel_name=channel_name,
        event_kind=row.event_kind,
        user_id=row.user_id or None,
        recipient=row.recipient or None,
        created_by=row.created_by,
        created_at=store.as_utc(row.created_at),
    )


def _whose(principal: Principal, body: SubscriptionCreate) -> str:
    """The ``user_id`` a new subscription stores ('' = everyone's events)."""
    if body.all_users:
        if body.user_id is not None:
            raise InvalidInput("Give user_id or all_users, not both")
        if not principal.is_admin:
            raise Forbidden("Only administrators subscribe to everyone's events.")
        return ""
    user_id = body.user_id or principal.user_id
    if user_id != principal.user_id and not principal.is_admin:
        raise Forbidden("You may only subscribe to your own events.")
    return user_id


def create_subscription(
    session: Session, principal: Principal, body: SubscriptionCreate
) -> SubscriptionOut:
    channel = _visible_channel(session, principal, body.channel_id)
    user_id = _whose(principal, body)
    if body.recipient is not None and channel.kind != "email":
        raise InvalidInput("recipient is only for e-mail channels")
    recipient = body.recipient or ""
    if store.subscription_exists(session, channel.id, user_id, body.event_kind, recipient):
        raise Conflict("This subscription exists already")
    row = NotificationSubscription(
        id=new_id(),
        channel_id=channel.id,
        user_id=user_id,
        event_kind=body.event_kind,
        recipient=recipient,
        created_by=principal.user_id,
        created_at=store.utcnow(),
    )
    session.add(row)
    session.flush()
    return _subscription_out(row, channel.name)


def list_subscriptions(
    session: Session, principal: Principal, user_id: str | None
) -> SubscriptionList:
    """An administrator's: everyone's, or ``user_id``'s; a user's: their own (whatever
    ``user_id`` they name: another user's list is empty to them)."""
    if not principal.is_admin:
        if user_id is not None and user_id != principal.user_id:
            return SubscriptionList(items=[])
        user_id = principal.user_id
    rows = store.list_subscriptions(session, user_id)
    return SubscriptionList(items=[_subscription_out(row, name) for row, name in rows])


def _visible_subscription(
    session: Session, principal: Principal, subscription_id: str
) -> tuple[NotificationSubscription, str]:
    found = store.get_subscription(session, subscription_id)
    if found is None or not (principal.is_admin or found[0].user_id == principal.user_id):
        raise NotFound(f"Subscription {subscription_id} not found")
    return found


def get_subscription(
    session: Session, principal: Principal, subscription_id: str
) -> SubscriptionOut:
    return _subscription_out(*_visible_subscription(session, principal, subscription_id))


def delete_subscription(session: Session, principal: Principal, subscription_id: str) -> None:
    row, _name = _visible_subscription(session, principal, subscription_id)
    session.delete(row)
    session.flush()


# -- dead letters ------------------------------------------------------------------------------


def list_dead_letters(session: Session, limit: int, offset: int) -> DeadLetterList:
    rows = store.list_dead_letters(session, limit, offset)
    return DeadLetterList(
        items=[
            DeadLetter(
                id=d.id,
                event_id=d.event_id,
                event_kind=kind,
                channel_id=d.channel_id,
                channel_name=name,
                recipient=d.recipient or None,
                attempts=d.attempts,
                last_error=d.last_error,
                created_at=store.as_utc(d.created_at),
                failed_at=store.as_utc(d.next_attempt_at),
            )
            for d, kind, name in rows
        ],
        limit=limit,
        offset=offset,
    )


def _delivery_out(row: NotificationDelivery) -> DeliveryOut:
    return DeliveryOut(
        id=row.id,
        event_id=row.event_id,
        channel_id=row.channel_id,
        state=row.state,
        attempts=row.attempts,
        next_attempt_at=store.as_utc(row.next_attempt_at),
        last_error=row.last_error,
    )


def retry_dead_letter(session: Session, delivery_id: str) -> DeliveryOut:
    """Make a dead letter due now with a fresh count of tries."""
    row = store.retry_dead_letter(session, delivery_id, store.utcnow())
    if row is None:
        raise NotFound(f"Dead letter {delivery_id} not found")
    return _delivery_out(row)
