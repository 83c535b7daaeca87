"""The SQL of notifications: fan-out, claims, outcomes, dead letters; channels, subscriptions.

Claims take rows with one conditional ``UPDATE`` whose inner ``SELECT`` is ``FOR UPDATE SKIP
LOCKED`` on PostgreSQL (dispatchers in several processes never take the same row), and which on
SQLite starts the transaction with its write (the database's one write lock, never a read
snapshot upgraded). A claimed delivery is ``sending`` until its lease (``next_attempt_at``)
ends: a dispatcher that dies mid-send leaves it due again, and it is sent again under the same
event id.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, and_, func, select, update
from sqlalchemy.orm import Session

from app.core.prepared import dialect_insert
from app.models import (
    NotificationChannel,
    NotificationDelivery,
    NotificationEvent,
    NotificationSubscription,
)
from app.notifications.channels import Channel
from app.notifications.events import ALL_KINDS

_ch = NotificationChannel
_sub = NotificationSubscription
_ev = NotificationEvent
_dl = NotificationDelivery


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """SQLite returns naive datetimes; every stored one is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def backoff_seconds(
    attempts: int, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """The wait after the ``attempts``-th failed try: base x 2^(attempts-1), at most ``cap``,
    less up to a quarter at random (receivers coming back are not hit by every sender at once)."""
    delay = min(cap, base * 2.0 ** max(0, attempts - 1))
    jitter: float = (rng or random).random()  # spreads retries out; not a secret
    return delay * (0.75 + 0.25 * jitter)


def channel_of(row: Any) -> Channel:
    return Channel(
        id=row.id,
        name=row.name,
        kind=row.kind,
        config=json.loads(row.config),
        secret=row.secret,
        enabled=bool(row.enabled),
        user_selectable=bool(row.user_selectable),
        created_by=row.created_by,
        created_at=as_utc(row.created_at),
    )


# -- fan-out: events to deliveries -----------------------------------------------------------


def _claim(
    conn: Connection,
    table: Any,
    due: Any,
    order: Any,
    limit: int,
    values: dict[str, Any],
    returning: Sequence[Any],
) -> Sequence[Any]:
    """Update up to ``limit`` due rows (skipping rows locked by another claim on PostgreSQL);
    the ``returning`` columns of the rows taken."""
    pick = select(table.c.id).where(due).order_by(order).limit(limit)
    if conn.dialect.name == "postgresql":
        pick = pick.with_for_update(skip_locked=True)
    statement = (
        update(table)
        .where(table.c.id.in_(pick.scalar_subquery()))
        .values(**values)
        .returning(*returning)
    )
    return conn.execute(statement).all()


def _any(engine: Engine, table: Any, due: Any) -> bool:
    """Whether a row is due, by a read: an idle round takes no write lock (on SQLite a write
    statement takes the database's one write lock even when it matches nothing)."""
    with engine.connect() as conn:
        return conn.execute(select(table.c.id).where(due).limit(1)).first() is not None


def fan_out(engine: Engine, now: datetime, limit: int) -> int:
    """Turn due pending events into one delivery per matching subscription; how many events.

    One transaction: the events' deliveries and their new state commit together. An event
    that no subscription wants is ``dropped``.
    """
    events: Any = _ev.__table__
    due = and_(events.c.state == "pending", events.c.next_attempt_at <= now)
    if not _any(engine, events, due):
        return 0
    with engine.begin() as conn:
        claimed = _claim(
            conn,
            events,
            due,
            events.c.next_attempt_at,
            limit,
            {"attempts": events.c.attempts + 1},  # the fan-out's own tries
            (events.c.id, events.c.kind, events.c.subject_user_id),
        )
        if not claimed:
            return 0
        subscriptions = conn.execute(
            select(_sub.channel_id, _sub.user_id, _sub.event_kind, _sub.recipient)
            .join(_ch, _ch.id == _sub.channel_id)
            .where(_ch.enabled.is_(True))
        ).all()
        deliveries: list[dict[str, Any]] = []
        states: dict[str, str] = {}
        for event_id, kind, subject in claimed:
            targets = {
                (s.channel_id, s.recipient)
                for s in subscriptions
                if s.event_kind in (kind, ALL_KINDS) and s.user_id in ("", subject)
            }
            states[event_id] = "dispatched" if targets else "dropped"
            deliveries += [
                {
                    "id": uuid.uuid4().hex,
                    "event_id": event_id,
                    "channel_id": channel_id,
                    "recipient": recipient,
                    "state": "pending",
                    "attempts": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                }
                for channel_id, recipient in sorted(targets)
            ]
        if deliveries:
            insert = dialect_insert(conn.dialect.name)(_dl.__table__)
            conn.execute(
                insert.on_conflict_do_nothing(
                    index_elements=["event_id", "channel_id", "recipient"]
                ),
                deliveries,
            )
        for state in ("dispatched", "dropped"):
            ids = [event_id for event_id, s in states.items() if s == state]
            if ids:
                conn.execute(update(events).where(events.c.id.in_(ids)).values(state=state))
        return len(claimed)


# -- deliveries --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claimed:
    """A delivery this dispatcher now sends: its try number and the claim that owns it."""

    id: str
    token: str
    attempts: int
    event_id: str
    payload: str
    recipient: str
    channel: Channel


def claim_deliveries(engine: Engine, now: datetime, limit: int, lease: timedelta) -> list[Claimed]:
    """Take up to ``limit`` due deliveries (pending and due, or sending with a lapsed lease) of
    enabled channels; each try is counted as it is claimed."""
    token = uuid.uuid4().hex
    table: Any = _dl.__table__
    enabled = select(_ch.id).where(_ch.enabled.is_(True))
    due = and_(
        table.c.state.in_(("pending", "sending")),
        table.c.next_attempt_at <= now,
        table.c.channel_id.in_(enabled.scalar_subquery()),
    )
    if not _any(engine, table, due):
        return []
    with engine.begin() as conn:
        taken = _claim(
            conn,
            table,
            due,
            table.c.next_attempt_at,
            limit,
            {
                "state": "sending",
                "claim_token": token,
                "attempts": table.c.attempts + 1,
                "next_attempt_at": now + lease,
            },
            (table.c.id,),
        )
        if not taken:
            return []
        rows = conn.execute(
            select(
                table.c.id,
                table.c.attempts,
                table.c.event_id,
                table.c.recipient,
                _ev.payload,
                _ch.id.label("ch_id"),
                _ch.name,
                _ch.kind,
                _ch.config,
                _ch.secret,
                _ch.enabled,
                _ch.user_selectable,
                _ch.created_by,
                _ch.created_at,
            )
            .join(_ev, _ev.id == table.c.event_id)
            .join(_ch, _ch.id == table.c.channel_id)
            .where(table.c.claim_token == token)
        ).all()
    return [
        Claimed(
            id=r.id,
            token=token,
            attempts=r.attempts,
            event_id=r.event_id,
            payload=r.payload,
            recipient=r.recipient,
            channel=Channel(
                id=r.ch_id,
                name=r.name,
                kind=r.kind,
                config=json.loads(r.config),
                secret=r.secret,
                enabled=bool(r.enabled),
                user_selectable=bool(r.user_selectable),
                created_by=r.created_by,
                created_at=as_utc(r.created_at),
            ),
        )
        for r in rows
    ]


@dataclass(frozen=True, slots=True)
class Outcome:
    claimed: Claimed
    error: str | None  # None: delivered


def record_outcomes(
    engine: Engine,
    outcomes: Iterable[Outcome],
    now: datetime,
    *,
    max_attempts: int,
    backoff_base: float,
    backoff_max: float,
) -> None:
    """Delivered, due again after a backoff, or dead after ``max_attempts`` tries.

    A delivered mark applies whoever holds the claim now (the receiver has it); a failure only
    while this claim still owns the row (a dispatcher whose lease lapsed reports nothing).
    """
    table: Any = _dl.__table__
    outcomes = list(outcomes)
    delivered = [o.claimed.id for o in outcomes if o.error is None]
    with engine.begin() as conn:
        if delivered:  # one statement for the common case
            conn.execute(
                update(table)
                .where(table.c.id.in_(delivered), table.c.state.in_(("pending", "sending")))
                .values(state="delivered", delivered_at=now, claim_token=None, last_error=None)
            )
        for outcome in outcomes:
            claimed = outcome.claimed
            if outcome.error is None:
                continue
            dead = claimed.attempts >= max_attempts
            wait = backoff_seconds(claimed.attempts, backoff_base, backoff_max)
            conn.execute(
                update(table)
                .where(
                    table.c.id == claimed.id,
                    table.c.claim_token == claimed.token,
                    table.c.state == "sending",
                )
                .values(
                    state="dead" if dead else "pending",
                    next_attempt_at=now if dead else now + timedelta(seconds=wait),
                    claim_token=None,
                    last_error=outcome.error,
                )
            )


def next_due(engine: Engine) -> datetime | None:
    """When the earliest pending event or delivery is due (None: nothing waits)."""
    table: Any = _dl.__table__
    with engine.connect() as conn:
        deliveries = conn.scalar(
            select(func.min(table.c.next_attempt_at)).where(
                table.c.state.in_(("pending", "sending"))
            )
        )
        events = conn.scalar(select(func.min(_ev.next_attempt_at)).where(_ev.state == "pending"))
    found = [as_utc(t) for t in (deliveries, events) if t is not None]
    return min(found) if found else None


# -- the API's reads and writes (in the request's session) -------------------------------------


def insert_channel(session: Session, channel: NotificationChannel) -> NotificationChannel:
    session.add(channel)
    session.flush()
    return channel


def get_channel(session: Session, channel_id: str) -> NotificationChannel | None:
    return session.get(NotificationChannel, channel_id)


def channel_name_taken(session: Session, name: str, except_id: str | None = None) -> bool:
    query = select(func.count()).select_from(_ch).where(_ch.name == name)
    if except_id is not None:
        query = query.where(_ch.id != except_id)
    return bool(session.scalar(query))


def list_channels(session: Session, *, selectable_only: bool) -> Sequence[NotificationChannel]:
    query = select(_ch).order_by(_ch.created_at, _ch.id)
    if selectable_only:
        query = query.where(_ch.user_selectable.is_(True), _ch.enabled.is_(True))
    return session.scalars(query).all()


def delete_channel(session: Session, channel: NotificationChannel) -> None:
    session.delete(channel)
    session.flush()


def subscription_exists(
    session: Session, channel_id: str, user_id: str, event_kind: str, recipient: str
) -> bool:
    return bool(
        session.scalar(
            select(func.count())
            .select_from(_sub)
            .where(
                _sub.channel_id == channel_id,
                _sub.user_id == user_id,
                _sub.event_kind == event_kind,
                _sub.recipient == recipient,
            )
        )
    )


def list_subscriptions(
    session: Session, user_id: str | None
) -> Sequence[tuple[NotificationSubscription, str]]:
    """Subscriptions with their channel's name; ``user_id`` given: only that user's."""
    query = (
        select(_sub, _ch.name)
        .join(_ch, _ch.id == _sub.channel_id)
        .order_by(_sub.created_at, _sub.id)
    )
    if user_id is not None:
        query = query.where(_sub.user_id == user_id)
    return [(row[0], row[1]) for row in session.execute(query).all()]


def get_subscription(
    session: Session, subscription_id: str
) -> tuple[NotificationSubscription, str] | None:
    row = session.execute(
        select(_sub, _ch.name)
        .join(_ch, _ch.id == _sub.channel_id)
        .where(_sub.id == subscription_id)
    ).first()
    return None if row is None else (row[0], row[1])


def list_dead_letters(
    session: Session, limit: int, offset: int
) -> Sequence[tuple[NotificationDelivery, str, str]]:
    rows = session.execute(
        select(_dl, _ev.kind, _ch.name)
        .join(_ev, _ev.id == _dl.event_id)
        .join(_ch, _ch.id == _dl.channel_id)
        .where(_dl.state == "dead")
        .order_by(_dl.next_attempt_at.desc(), _dl.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return [(row[0], row[1], row[2]) for row in rows]


def retry_dead_letter(
    session: Session, delivery_id: str, now: datetime
) -> NotificationDelivery | None:
    """A dead delivery made due now with a fresh count of tries; None if there is none."""
    changed = session.execute(
        update(_dl)
        .where(_dl.id == delivery_id, _dl.state == "dead")
        .values(state="pending", attempts=0, next_attempt_at=now, claim_token=None)
        .returning(_dl.id)
    ).first()
    if changed is None:
        return None
    delivery = session.get(NotificationDelivery, delivery_id)
    if delivery is not None:
        session.refresh(delivery)
    return delivery


def outbox_counts(engine: Engine) -> dict[str, int]:
    """Deliveries by state and pending events: what the dispatcher still has to do."""
    with engine.connect() as conn:
        rows = conn.execute(select(_dl.state, func.count()).group_by(_dl.state)).all()
        pending = conn.scalar(select(func.count()).select_from(_ev).where(_ev.state == "pending"))
    counts = {str(state): int(n) for state, n in rows}
    counts["events_pending"] = int(pending or 0)
    return counts
