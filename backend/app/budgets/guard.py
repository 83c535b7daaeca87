"""Budgets enforced before each LLM call: reserve the worst case, settle to the real cost.

Scopes (``BudgetScope``) and their windows, all in UTC:

- ``task``: everything a task spends, over its whole life;
- ``user_daily`` / ``user_monthly``: a user's spend in the current calendar day / month;
- ``global_daily``: everyone's spend in the current calendar day.

Calendar windows rather than rolling ones: each window is one counter row, so admitting a call
is one conditional UPDATE per scope, race-free across processes; a rolling 24 h window would
need a scan of recent calls (or many bucket rows) under a lock. The price is the boundary: a
user can spend up to a day's limit just before midnight UTC and another just after.

Limits come from the environment (``BUDGET_*``; unset = unlimited) unless an administrator set an
override for the scope and subject through ``/api/v1/limits`` (an override may also be
"unlimited").

Counters exist where limits apply. The first limited call of a window creates the counters of
its scopes, each starting from what the ledger's daily rollups say was spent in that window
(``budgets_store.seed_counters``), so a limit set in the middle of a window applies to what was
already spent in it. From then on the ledger keeps them: inserting a usage row adds its cost to
the counters of its windows that exist (a trigger, Alembic revision 0005), in the row's own
transaction, whatever wrote the row (a call, the spool replayed after an outage). A call that no
scope limits reserves nothing (``reserve`` only reads the overrides, or on SQLite reuses what it
read while no override change is signalled: ``app.budgets.override_signal``) and runs no budget
code after the call: budgets cost it one read, and the global-day row is not a point every call must
pass through unless a global cap is set. On PostgreSQL the seeding transaction first waits for
the ledger writers in flight (``LOCK TABLE ... IN SHARE MODE``), so a call's spend is either in
the sum a counter starts from or added by the trigger, never both, never neither.

Before a call, ``DatabaseBudgetGuard.reserve`` computes the call's worst-case cost: estimated
prompt tokens (``estimate_prompt_tokens``: 4 characters a token plus 4 per message, plus the tool
definitions and ``PROMPT_OVERHEAD_TOKENS``) at the input price, plus ``max_completion_tokens`` or
``max_tokens`` (else ``BUDGET_DEFAULT_MAX_OUTPUT_TOKENS``) times ``n`` at the output price. In one
transaction it adds that amount to the reserved total of each scope's counter with a conditional
UPDATE (``spent + reserved + amount <= limit``) and records the reservation with an expiry; if any
scope refuses, the transaction rolls back and ``BudgetExceededError`` names the first scope that
refused. After the call, ``settle`` replaces the reservation with the call's recorded cost (0 on
a plain error or cancellation; the real cost even when it exceeds the reservation, so no spend is
ever lost), booked in the UTC day the usage ledger books it. Reservations of a process that died
expire after ``BUDGET_RESERVATION_TTL_SECONDS`` and are reclaimed by the next sweep (every minute
from the reserve path, and at once when a scope refuses a call).

Models without a known price reserve 0: they are admitted only while their scopes still have
something left, and their calls (recorded ``unpriced``) add nothing to spend — give them a price
in ``PRICE_OVERRIDES`` to budget them.

If the budget store fails (the database is unreachable), calls are refused with
``BudgetUnavailableError`` (503) when any ``BUDGET_*`` default limit is set; with none set they go
ahead unmetered (logged, and counted in ``llm_tracking_errors_total{stage="budget"}``), as
per-user and per-task overrides cannot be read then. A settle that fails the same way is logged
by the client (``llm_tracking_errors_total{stage="settle"}``); its reservation stays held until it
expires (erring towards refusing), and its cost reaches the usage ledger but not the counters.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from app.budgets import store
from app.budgets.override_signal import LimitsCache, override_signal
from app.budgets.store import CounterKey, CounterState, OverrideLimit
from app.core.config import Settings
from app.core.errors import BudgetExceededError, BudgetUnavailableError
from app.core.money import pico_to_usd, usd_to_pico
from app.core.prepared import Tx, write_gate
from app.models import BudgetScope
from app.notifications import outbox as notification_outbox  # issue 16: events in the outbox
from app.observability import LLM_BUDGET_BLOCKED, LLM_BUDGET_SOFT_LIMIT, TRACKING_ERRORS
from app.tracking.pricing import PriceBook, TokenUsage
from app.tracking.record import UsageRecord
from app.tracking.tracker import CallContext, estimate_prompt_tokens, estimate_tokens

__all__ = [
    "BudgetExceededError",
    "BudgetScope",
    "BudgetUnavailableError",
    "DatabaseBudgetGuard",
    "Reservation",
    "WorstCase",
    "worst_case_tokens",
]

logger = logging.getLogger(__name__)

LimitSource = Literal["override", "default", "none"]
# Tokens every chat request carries beyond its messages (the reply's priming).
PROMPT_OVERHEAD_TOKENS = 3
# The task scope has one window, its whole life; this is its ``window_start``.
TASK_WINDOW = date(1970, 1, 1)
SWEEP_INTERVAL_SECONDS = 60.0
SWEEP_BATCH = 500


def utcnow() -> datetime:
    return datetime.now(UTC)


# -- windows ----------------------------------------------------------------------------------


def window_start(scope: BudgetScope, day: date) -> date:
    if scope is BudgetScope.TASK:
        return TASK_WINDOW
    if scope is BudgetScope.USER_MONTHLY:
        return day.replace(day=1)
    return day


def window_end(scope: BudgetScope, start: date) -> date | None:
    """The first day after the window (exclusive end), None for a task."""
    if scope is BudgetScope.TASK:
        return None
    if scope is BudgetScope.USER_MONTHLY:
        return (start.replace(day=28) + timedelta(days=4)).replace(day=1)
    return start + timedelta(days=1)


def counter_keys(task_id: str | None, user_id: str | None, day: date) -> list[CounterKey]:
    """The counters a call of this task and user on this UTC day is booked to, in lock order."""
    keys: list[CounterKey] = []
    if task_id:
        keys.append(CounterKey(BudgetScope.TASK, task_id, TASK_WINDOW))
    if user_id:
        keys.append(CounterKey(BudgetScope.USER_DAILY, user_id, day))
        keys.append(CounterKey(BudgetScope.USER_MONTHLY, user_id, day.replace(day=1)))
    keys.append(CounterKey(BudgetScope.GLOBAL_DAILY, "", day))
    return keys


# -- limits -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limit:
    """The effective limit of one scope for one subject (None = unlimited)."""

    limit_pico: int | None
    soft_threshold: Decimal
    source: LimitSource


def default_limit_pico(settings: Settings, scope: BudgetScope) -> int | None:
    usd = {
        BudgetScope.TASK: settings.budget_task_max_usd,
        BudgetScope.USER_DAILY: settings.budget_user_daily_usd,
        BudgetScope.USER_MONTHLY: settings.budget_user_monthly_usd,
        BudgetScope.GLOBAL_DAILY: settings.budget_global_daily_usd,
    }[scope]
    return None if usd is None else usd_to_pico(usd)


def effective_limit(
    settings: Settings,
    scope: BudgetScope,
    override: OverrideLimit | store.OverrideRow | None,
) -> Limit:
    threshold = settings.budget_soft_threshold
    if override is not None:
        return Limit(override.limit_pico, override.soft_threshold or threshold, "override")
    default = default_limit_pico(settings, scope)
    return Limit(default, threshold, "none" if default is None else "default")


def default_limits(settings: Settings) -> dict[BudgetScope, Limit]:
    """The environment's limit of each scope."""
    return {scope: effective_limit(settings, scope, None) for scope in BudgetScope}


def resolve_limits(
    tx: Tx,
    settings: Settings,
    task_id: str | None,
    user_id: str | None,
    keys: list[CounterKey],
    defaults: Mapping[BudgetScope, Limit],
) -> dict[BudgetScope, Limit]:
    """Each key's limit: its override if an administrator set one, else ``defaults``."""
    overrides = store.read_override_limits(tx, task_id, user_id)
    return {
        k.scope: (
            defaults[k.scope]
            if (override := overrides.get((k.scope, k.subject_id))) is None
            else effective_limit(settings, k.scope, override)
        )
        for k in keys
    }


def any_default_limit(settings: Settings) -> bool:
    return any(default_limit_pico(settings, scope) is not None for scope in BudgetScope)


# -- the worst case ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorstCase:
    prompt_tokens: int
    completion_tokens: int
    cost_pico: int
    priced: bool


def _positive_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def worst_case_tokens(request: Mapping[str, Any], default_max_output: int) -> TokenUsage:
    """The most tokens a request may be billed for, as far as can be known before it is sent."""
    prompt = estimate_prompt_tokens(request.get("messages") or []) + PROMPT_OVERHEAD_TOKENS
    for extra in ("tools", "functions", "response_format"):
        if request.get(extra):
            prompt += estimate_tokens(json.dumps(request[extra], default=str))
    output = (
        _positive_int(request.get("max_completion_tokens"))
        or _positive_int(request.get("max_tokens"))
        or default_max_output
    )
    choices = _positive_int(request.get("n")) or 1
    return TokenUsage(prompt_tokens=prompt, completion_tokens=output * choices)


def worst_case(
    price_book: PriceBook,
    model: str,
    request: Mapping[str, Any],
    default_max_output: int,
    provider: str | None = None,
) -> WorstCase:
    tokens = worst_case_tokens(request, default_max_output)
    price = price_book.unit_price(model, provider)
    cost = 0 if price is None else usd_to_pico(price.cost(tokens))
    return WorstCase(tokens.prompt_tokens, tokens.completion_tokens, cost, price is not None)


def _unlimited(limits: Mapping[BudgetScope, Limit]) -> bool:
    return all(limit.limit_pico is None for limit in limits.values())


# -- the guard --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reservation:
    """The handle ``reserve`` returns and ``settle`` consumes.

    ``held`` is False when none of the call's scopes had a limit: nothing was reserved, and
    settling only books the spend.
    """

    id: str
    amount_pico: int
    task_id: str | None
    user_id: str | None
    window_day: date
    limits: Mapping[BudgetScope, Limit]
    held: bool = True


class DatabaseBudgetGuard:
    """The ``BudgetGuard`` of ``LLMClient``: counters in the database, shared by all processes.

    Thread-safe; one per ``Runtime`` (``runtime.budget_guard``).
    """

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        price_book: PriceBook,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._engine = engine
        self._gate = write_gate(engine)
        self._settings = settings
        self._defaults = default_limits(settings)
        self._limits_cache: LimitsCache[dict[BudgetScope, Limit]] = LimitsCache(
            override_signal(engine)
        )
        self._price_book = price_book
        self._clock = clock
        self._ttl = timedelta(seconds=settings.budget_reservation_ttl_seconds)
        self._sweep_lock = threading.Lock()
        self._next_sweep = 0.0

    def worst_case(
        self, model: str, request: Mapping[str, Any], provider: str | None = None
    ) -> WorstCase:
        return worst_case(
            self._price_book,
            model,
            request,
            self._settings.budget_default_max_output_tokens,
            provider,
        )

    def reserve(
        self, *, context: CallContext, model: str, request: Mapping[str, Any]
    ) -> Reservation | None:
        """Reserve the call's worst-case cost on every scope, or raise ``BudgetExceededError``.

        Returns None (nothing to settle) only when the database is unreachable and no default
        limit is configured.
        """
        now = self._clock()
        amount = functools.cache(
            lambda: self.worst_case(model, request, context.provider).cost_pico
        )
        try:
            try:
                return self._reserve(context, amount, now)
            except BudgetExceededError:
                # A dead process's reservations may be what fills the scope: reclaim, retry once.
                if self.sweep_expired(now=now) == 0:
                    raise
                return self._reserve(context, amount, now)
        except BudgetExceededError as exc:
            LLM_BUDGET_BLOCKED.labels(exc.scope).inc()
            # Notifications (issue 16): budget.exhausted, once per window; never raises.
            notification_outbox.record_budget_blocked(self._engine, exc, context.user_id)
            raise
        except SQLAlchemyError as exc:
            self._unavailable(exc)
            return None

    def reserve_nowait(self, *, context: CallContext) -> Reservation | None:
        """The (empty) reservation of a call that no scope limits, when a read that never waits
        can tell (SQLite); None otherwise: then ``reserve`` decides.

        For event loops: the common case, nothing limited, costs no thread hop.
        """
        day = self._clock().date()
        keys = counter_keys(context.task_id, context.user_id, day)
        try:
            limits = self._limits(context, keys, wait=False)
        except SQLAlchemyError:
            return None  # ``reserve`` will say whether calls may go ahead
        if limits is None or any(limit.limit_pico is not None for limit in limits.values()):
            return None
        return Reservation("", 0, context.task_id, context.user_id, day, limits, held=False)

    def _limits(
        self, context: CallContext, keys: list[CounterKey], *, wait: bool
    ) -> dict[BudgetScope, Limit] | None:
        """The call's limits: reused while no override changed (SQLite, ``override_signal``),
        else read on the kept local connection when free, else (``wait``) on one from the pool;
        None when it would have to wait and ``wait`` is False."""
        return self._limits_cache.get(
            context.task_id, context.user_id, lambda: self._read_limits(context, keys, wait)
        )

    def _read_limits(
        self, context: CallContext, keys: list[CounterKey], wait: bool
    ) -> dict[BudgetScope, Limit] | None:
        with self._gate.local_read() as tx:
            if tx is not None:
                return resolve_limits(
                    tx, self._settings, context.task_id, context.user_id, keys, self._defaults
                )
        if not wait:
            return None
        with self._gate.transaction(write=False) as tx:
            return resolve_limits(
                tx, self._settings, context.task_id, context.user_id, keys, self._defaults
            )

    def _reserve(
        self, context: CallContext, worst_case: Callable[[], int], now: datetime
    ) -> Reservation:
        day = now.date()
        keys = counter_keys(context.task_id, context.user_id, day)
        # SQLite: the limits from a read first, and a write transaction only if one applies
        # (that transaction must start with its write). PostgreSQL: the limits are read in the
        # reservation's own transaction (one transaction, not two: each costs round trips),
        # which writes nothing if none applies.
        limits = self._limits(context, keys, wait=self._engine.dialect.name == "sqlite")
        if limits is not None and _unlimited(limits):
            return self._unheld(context, day, limits)
        self._sweep_if_due(now)  # reclaim what dead processes held, before taking more
        for attempt in range(3):
            try:
                return self._hold(context, worst_case, keys, limits, now)
            except store.CounterMissing:
                if attempt == 2:
                    raise
                # The first limited call of a window: make its counters from the ledger (in a
                # transaction of its own, holding no counter row), then try again.
                with self._gate.transaction() as tx:
                    store.seed_counters(tx, keys, now)
        raise AssertionError("unreachable")

    def _unheld(
        self, context: CallContext, day: date, limits: Mapping[BudgetScope, Limit]
    ) -> Reservation:
        # Nothing limits this call: no reservation to hold, no write before the call. Its
        # spend reaches the ledger, where a counter made later starts from.
        return Reservation("", 0, context.task_id, context.user_id, day, limits, held=False)

    def _hold(
        self,
        context: CallContext,
        worst_case: Callable[[], int],
        keys: list[CounterKey],
        limits: Mapping[BudgetScope, Limit] | None,
        now: datetime,
    ) -> Reservation:
        """Take the reservation on every counter of the call, or on none of them."""
        day = now.date()
        # Raising inside the block rolls back every scope's increment made before it.
        with self._gate.transaction() as tx:
            if limits is None:
                limits = resolve_limits(
                    tx, self._settings, context.task_id, context.user_id, keys, self._defaults
                )
                if _unlimited(limits):
                    return self._unheld(context, day, limits)  # nothing was written
            amount = worst_case()  # only now: a call nothing limits never needs it
            row = store.ReservationRow(
                uuid.uuid4().hex, amount, context.task_id, context.user_id, day
            )
            # The reservation row before the counters: on SQLite the transaction starts with a
            # write (it takes the write lock at once, never upgrading a read snapshot), and the
            # counter rows (the global one is everybody's) stay locked only from their UPDATE
            # to the commit.
            store.insert_reservation(tx, row, created_at=now, expires_at=now + self._ttl)
            for key in keys:
                limit = limits[key.scope].limit_pico
                if not store.try_reserve(tx, key, amount, limit, now):
                    state = store.read_counter(tx, key) or CounterState()
                    raise self._exceeded(key, limit or 0, state, amount)
        return Reservation(row.id, amount, context.task_id, context.user_id, day, limits)

    @staticmethod
    def _exceeded(
        key: CounterKey, limit_pico: int, state: CounterState, amount: int
    ) -> BudgetExceededError:
        return BudgetExceededError(
            scope=key.scope.value,
            subject_id=key.subject_id or None,
            window_start=None if key.scope is BudgetScope.TASK else key.window_start,
            window_end=window_end(key.scope, key.window_start),
            limit_usd=pico_to_usd(limit_pico),
            spent_usd=pico_to_usd(state.spent_pico),
            reserved_usd=pico_to_usd(state.reserved_pico),
            requested_usd=pico_to_usd(amount),
        )

    def _unavailable(self, exc: SQLAlchemyError) -> None:
        TRACKING_ERRORS.labels("budget").inc()
        if any_default_limit(self._settings):
            raise BudgetUnavailableError(
                "Budgets cannot be checked (the budget store failed); the call was not made."
            ) from exc
        logger.warning("Budget store failed; the call goes ahead unmetered: %s", exc)

    def settle(self, reservation: Reservation, record: UsageRecord, tx: Tx | None = None) -> None:
        """Release the reservation now that the call's row is (being) written.

        Inside ``tx`` when given (the client passes the usage row's transaction, so the ledger
        and the counters commit together), else in a transaction of its own. The spend is
        booked by the ledger itself when the row is inserted, in the UTC day (and month) of the
        record, on every counter that exists; the reservation is released from the windows it
        was taken in, unless a sweep already reclaimed it. Soft limits are checked on the
        counters' states after both.
        """
        if not reservation.held:
            return  # nothing reserved; the ledger books the spend
        if tx is None:
            with self._gate.transaction() as own:
                released, after, warned = self._settle_on(own, reservation, record)
        else:
            released, after, warned = self._settle_on(tx, reservation, record)
        if not released:
            logger.warning(
                "Reservation %s had expired before its call settled; "
                "BUDGET_RESERVATION_TTL_SECONDS is shorter than that call.",
                reservation.id,
            )
        for key in warned:
            self._warn_soft_limit(key, reservation.limits[key.scope], after[key])

    def _settle_on(
        self, tx: Tx, reservation: Reservation, record: UsageRecord
    ) -> tuple[bool, dict[CounterKey, CounterState], list[CounterKey]]:
        # The spend itself is booked by the ledger: inserting the usage row adds its cost to
        # the counters that exist (the trigger of revision 0005), in this same transaction.
        released = store.delete_reservation(tx, reservation.id)
        deltas = {}
        if released:
            keys = counter_keys(reservation.task_id, reservation.user_id, reservation.window_day)
            deltas = dict.fromkeys(keys, (0, -reservation.amount_pico))
        after = store.apply_counter_deltas(tx, deltas, self._clock())
        warned = [
            key
            for key, state in after.items()
            if self._crossed_soft_limit(reservation.limits.get(key.scope), state)
            and store.mark_soft_warned(tx, key)
        ]
        for key in warned:  # notifications (issue 16): in the crossing's own transaction
            notification_outbox.record_soft_threshold(
                tx,
                scope=key.scope.value,
                subject_id=key.subject_id,
                window_start=key.window_start,
                limit_pico=reservation.limits[key.scope].limit_pico,
                spent_pico=after[key].spent_pico,
                soft_threshold=reservation.limits[key.scope].soft_threshold,
                user_id=reservation.user_id,
            )
        return released, after, warned

    @staticmethod
    def _crossed_soft_limit(limit: Limit | None, state: CounterState) -> bool:
        if limit is None or limit.limit_pico is None or state.soft_warned:
            return False
        return state.spent_pico >= limit.soft_threshold * limit.limit_pico

    @staticmethod
    def _warn_soft_limit(key: CounterKey, limit: Limit, state: CounterState) -> None:
        LLM_BUDGET_SOFT_LIMIT.labels(key.scope.value).inc()
        logger.warning(
            "Budget %s%s reached %s%% of its limit: spent $%s of $%s (window from %s).",
            key.scope.value,
            f" of {key.subject_id}" if key.subject_id else "",
            format((limit.soft_threshold * 100).normalize(), "f"),
            format(pico_to_usd(state.spent_pico), "f"),
            format(pico_to_usd(limit.limit_pico), "f"),
            key.window_start.isoformat(),
        )

    # -- expiry ---------------------------------------------------------------------------

    def sweep_expired(self, *, now: datetime | None = None) -> int:
        """Release the reservations whose expiry has passed; how many were released."""
        now = now or self._clock()
        total = 0
        while True:
            with self._engine.begin() as conn:
                expired = store.delete_expired_reservations(conn, now, SWEEP_BATCH)
                deltas: dict[CounterKey, tuple[int, int]] = {}
                for row in expired:
                    for key in counter_keys(row.task_id, row.user_id, row.window_day):
                        deltas[key] = (0, deltas.get(key, (0, 0))[1] - row.amount_pico)
                store.apply_counter_deltas(Tx.of(conn), deltas, now)
            if expired:
                logger.warning("Released %d expired budget reservations", len(expired))
            total += len(expired)
            if len(expired) < SWEEP_BATCH:
                return total

    def _sweep_if_due(self, now: datetime) -> None:
        if time.monotonic() < self._next_sweep or not self._sweep_lock.acquire(blocking=False):
            return
        try:
            self._next_sweep = time.monotonic() + SWEEP_INTERVAL_SECONDS
            self.sweep_expired(now=now)
        finally:
            self._sweep_lock.release()
