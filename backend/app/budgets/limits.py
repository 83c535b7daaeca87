"""The administrator's side of budgets: limit overrides and where each scope stands.

Services take the request's session first and only execute statements in its transaction; the
caller commits. An override replaces the environment default for one scope and subject; its
limit may be None (explicitly unlimited). Deleting it brings the default back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

from sqlalchemy.orm import Session

from app.budgets import store
from app.budgets.guard import (
    LIFETIME_SCOPES,
    Limit,
    effective_limit,
    utcnow,
    window_end,
    window_start,
)
from app.budgets.override_signal import announce_after_commit
from app.budgets.store import CounterKey, OverrideRow
from app.core.config import Settings
from app.core.errors import NotFound
from app.core.money import usd_to_pico
from app.models import BudgetScope


@dataclass(frozen=True, slots=True)
class ScopeStatus:
    """One scope of one subject in its current window, in picodollars."""

    scope: BudgetScope
    subject_id: str | None
    window_start: date | None
    window_end: date | None
    limit: Limit
    spent_pico: int
    reserved_pico: int

    @property
    def remaining_pico(self) -> int | None:
        if self.limit.limit_pico is None:
            return None
        return max(self.limit.limit_pico - self.spent_pico - self.reserved_pico, 0)


def _key(scope: BudgetScope, subject_id: str, day: date) -> CounterKey:
    return CounterKey(scope, subject_id, window_start(scope, day))


def scope_status(
    session: Session,
    settings: Settings,
    scope: BudgetScope,
    subject_id: str,
    *,
    now: datetime | None = None,
) -> ScopeStatus:
    """The effective limit of ``scope`` for ``subject_id`` ('' for global) and its counter."""
    conn = session.connection()
    key = _key(scope, subject_id, (now or utcnow()).date())
    override = store.read_overrides(conn, [(scope, subject_id)]).get(scope)
    # Where no limit has applied yet there is no counter: the ledger says what was spent.
    state = store.read_counter(conn, key) or store.CounterState(store.ledger_spend(conn, key))
    is_task = scope in LIFETIME_SCOPES  # one window: the task's or the key's life
    return ScopeStatus(
        scope=scope,
        subject_id=subject_id or None,
        window_start=None if is_task else key.window_start,
        window_end=window_end(scope, key.window_start),
        limit=effective_limit(settings, scope, override),
        spent_pico=state.spent_pico,
        reserved_pico=state.reserved_pico,
    )


def user_status(
    session: Session, settings: Settings, user_id: str, *, now: datetime | None = None
) -> tuple[ScopeStatus, ScopeStatus]:
    """A user's daily and monthly budgets."""
    return (
        scope_status(session, settings, BudgetScope.USER_DAILY, user_id, now=now),
        scope_status(session, settings, BudgetScope.USER_MONTHLY, user_id, now=now),
    )


def set_override(
    session: Session,
    settings: Settings,
    scope: BudgetScope,
    subject_id: str,
    *,
    limit_usd: Decimal | None,
    soft_threshold: Decimal | None,
    updated_by: str | None,
    now: datetime | None = None,
) -> ScopeStatus:
    """Set (or replace) the override; it applies from the next reservation on."""
    now = now or utcnow()
    announce_after_commit(session)
    store.upsert_override(
        session.connection(),
        scope,
        subject_id,
        limit_pico=None if limit_usd is None else usd_to_pico(limit_usd),
        soft_threshold=soft_threshold,
        updated_by=updated_by,
        now=now,
    )
    return scope_status(session, settings, scope, subject_id, now=now)


def remove_override(session: Session, scope: BudgetScope, subject_id: str) -> None:
    """Delete the override so that the environment default applies again."""
    announce_after_commit(session)
    if not store.delete_override(session.connection(), scope, subject_id):
        raise NotFound(f"No {scope.value} limit override for {subject_id or 'global'}.")


def list_overrides(
    session: Session, scope: BudgetScope | None, *, limit: int, offset: int
) -> Sequence[OverrideRow]:
    return store.list_overrides(session.connection(), scope, limit=limit, offset=offset)


# -- a gateway key's own budget (scope ``key``, over the key's whole life) --------------------


def set_key_budget(
    session: Session,
    settings: Settings,
    key_id: str,
    budget_usd: Decimal | None,
    *,
    updated_by: str | None,
) -> None:
    """Give a key a budget of its own (None: remove it, the key is limited only by its user's
    and the global budgets)."""
    if budget_usd is None:
        announce_after_commit(session)
        store.delete_override(session.connection(), BudgetScope.KEY, key_id)
        return
    set_override(
        session,
        settings,
        BudgetScope.KEY,
        key_id,
        limit_usd=budget_usd,
        soft_threshold=None,
        updated_by=updated_by,
    )


def key_budget(session: Session, settings: Settings, key_id: str) -> ScopeStatus | None:
    """A key's own budget and its spend, or None when it has none."""
    status = scope_status(session, settings, BudgetScope.KEY, key_id)
    return status if status.limit.limit_pico is not None else None
