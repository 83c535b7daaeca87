"""Recording events in the outbox, in the transaction of the fact that caused them.

``record_event`` is one ``INSERT ... ON CONFLICT DO NOTHING`` on the caller's connection, inside
the caller's transaction: the event commits with its fact or not at all, and recording the same
fact twice (a retried transaction, a second process) leaves one row. Nothing is sent here; the
dispatcher (``app.notifications.dispatcher``) delivers later, so a slow receiver never holds up
the code that records.

A refused LLM call changes nothing in the database (its reservation rolls back), so
``record_budget_blocked`` writes its event in a transaction of its own, once per scope, subject
and window: the process remembers what it recorded, so a scope that keeps refusing calls costs
no further write. Models used without a price are found from the daily rollup by
``record_unpriced_models`` (the dispatcher runs it): the rollup is the durable fact, and the scan
is idempotent.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app.core.errors import BudgetExceededError
from app.core.money import usd_to_pico
from app.core.prepared import Statement, Tx, dialect_insert, per_engine, write_gate
from app.models import NotificationEvent, UsageRollupDailyOverall
from app.notifications.events import (
    Event,
    EventKind,
    budget_event,
    dumps,
    model_unpriced_event,
)

logger = logging.getLogger(__name__)

_COLUMNS = (
    "id",
    "kind",
    "payload",
    "subject_user_id",
    "created_at",
    "state",
    "attempts",
    "next_attempt_at",
    "last_error",
)


def _add_event(dialect: str) -> Any:
    table: Any = NotificationEvent.__table__
    stmt = dialect_insert(dialect)(table).on_conflict_do_nothing(index_elements=["id"])
    return stmt.returning(table.c.id)


ADD_EVENT = Statement(_add_event, column_keys=_COLUMNS)


def event_values(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "kind": event.kind.value,
        "payload": dumps(event.body()),
        "subject_user_id": event.subject_user_id,
        "created_at": event.created_at,
        "state": "pending",
        "attempts": 0,
        "next_attempt_at": event.created_at,
        "last_error": None,
    }


def record_event(conn: Tx | Connection | Session, event: Event) -> bool:
    """Add ``event`` to the outbox in the caller's transaction; False if its id was there.

    ``conn``: the write gate's ``Tx``, a SQLAlchemy connection or a session (its connection).
    Raises what the database raises: the caller's transaction fails with its fact.
    """
    if isinstance(conn, Session):
        conn = conn.connection()
    tx = Tx.coerce(conn)
    try:
        return tx.execute(ADD_EVENT, event_values(event)).fetchone() is not None
    finally:
        if tx is not conn:
            tx.close()


def subject_user(scope: str, subject_id: str | None, user_id: str | None) -> str | None:
    """Whose event a budget's is: a user scope's user, else the call's user (None: global)."""
    if scope.startswith("user_"):
        return subject_id or None
    if scope == "global_daily":
        return None
    return user_id


def record_soft_threshold(
    tx: Tx | Connection,
    *,
    scope: str,
    subject_id: str,
    window_start: date,
    limit_pico: int | None,
    spent_pico: int,
    soft_threshold: Decimal,
    user_id: str | None,
) -> bool:
    """Record ``budget.soft_threshold`` in the settlement's transaction (the budget guard calls
    it for each counter whose soft limit that settlement crossed; the counter's ``soft_warned``
    flag and the event id make it once per scope, subject and window)."""
    return record_event(
        tx,
        budget_event(
            EventKind.BUDGET_SOFT_THRESHOLD,
            scope=scope,
            subject_id=subject_id,
            window_start=None if scope == "task" else window_start,
            limit_pico=limit_pico,
            spent_pico=spent_pico,
            soft_threshold=soft_threshold,
            user_id=subject_user(scope, subject_id, user_id),
        ),
    )


class _Recorded:
    """Ids this process has recorded already (bounded: forgotten wholesale when full)."""

    LIMIT = 10_000

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def __contains__(self, event_id: object) -> bool:
        with self._lock:
            return event_id in self._ids

    def add(self, event_id: str) -> None:
        with self._lock:
            if len(self._ids) >= self.LIMIT:
                self._ids.clear()
            self._ids.add(event_id)


_recorded_blocks = per_engine(lambda _engine: _Recorded())
_recorded_unpriced = per_engine(lambda _engine: _Recorded())


def record_budget_blocked(
    engine: Engine, exc: BudgetExceededError, user_id: str | None = None
) -> None:
    """Record that a scope refused a call (``budget.exhausted``), once per window; never raises.

    In a transaction of its own (the refusal rolled back everything else). A database error is
    logged: the refusal itself stands, and the next refusal tries again.
    """
    window = exc.extra.get("window_start")
    event = budget_event(
        EventKind.BUDGET_EXHAUSTED,
        scope=exc.scope,
        subject_id=exc.subject_id or "",
        window_start=date.fromisoformat(window) if window else None,
        limit_pico=usd_to_pico(exc.limit_usd),
        spent_pico=usd_to_pico(exc.spent_usd),
        user_id=subject_user(exc.scope, exc.subject_id, user_id),
    )
    seen = _recorded_blocks(engine)
    if event.id in seen:
        return
    try:
        with write_gate(engine).transaction() as tx:
            record_event(tx, event)
    except SQLAlchemyError as error:
        logger.warning("Could not record notification %s: %s", event.id, type(error).__name__)
        return
    seen.add(event.id)


def record_unpriced_models(engine: Engine, today: date | None = None) -> int:
    """Record ``model.unpriced`` for each model with unpriced calls this UTC month (once per
    model and month); how many events were new. Raises what the database raises."""
    today = today or datetime.now(UTC).date()
    month = today.replace(day=1)
    rollup = UsageRollupDailyOverall
    unpriced = func.sum(rollup.unpriced_calls)
    with engine.connect() as conn:
        rows = conn.execute(
            select(rollup.model, unpriced)
            .where(rollup.day >= month, rollup.day <= today)
            .group_by(rollup.model)
            .having(unpriced > 0)
        ).all()
    seen = _recorded_unpriced(engine)
    events = [model_unpriced_event(str(model), month, int(calls)) for model, calls in rows]
    events = [event for event in events if event.id not in seen]
    if not events:
        return 0
    # A write transaction that starts with its write (the write gate's): on SQLite it never
    # has to upgrade a read snapshot.
    with write_gate(engine).transaction() as tx:
        added = sum(record_event(tx, event) for event in events)
    for event in events:
        seen.add(event.id)
    return added
