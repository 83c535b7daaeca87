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
ever lost), booked in the UTC day the usage ledger books it. A reservation taken for an async
caller that was cancelled meanwhile (``asyncio.wait_for``) is given back at once (``give_back``).
Reservations of a process that died expire after ``BUDGET_RESERVATION_TTL_SECONDS`` and are
reclaimed by the next sweep (every minute from the reserve path, and at once when a scope refuses
a call).

Models without a known price reserve 0: they are admitted only while their scopes still have
something left, and their calls (recorded ``unpriced``) add nothing to spend — give them a price
in ``PRICE_OVERRIDES`` to budget them.

Async calls queued together on the tracking thread (``app.tracking.db_worker``) reserve in one
transaction (``_reserve_batch``): every counter row the batch needs is updated in lock order,
each reservation by the same conditional UPDATE as alone, and one refused on a later counter
gives back what it took on the earlier ones (rows the transaction already holds). A batch makes
no counter it finds missing and sweeps nothing inside its transaction: those calls go the way of
a call alone, after the batch commits. Where the service runs a writer process (the default
for a file or server database), an event loop's calls reserve there the same way, in batches of
the calls that arrived together, outside the service's GIL (``request``, ``reserve_requests``,
``adopt``; ``app.tracking.write_process``); a refusal or an outage is then decided again, and
recorded, on the tracking thread.

The database breaker (``app.tracking.breaker``): when the database is unavailable, or was a
moment ago (the breaker is open), ``reserve`` does not wait for it. A call is then refused at
once with ``BudgetUnavailableError`` (503, "the database is unavailable") when a limit may apply
to it: a ``BUDGET_*`` default limit is set, or this process last saw a limit on its task, its user
or the global scope (it remembers the last ``KNOWN_LIMITED_MAX`` subjects it read). Any other
call goes ahead unmetered (logged, counted in ``llm_tracking_errors_total{stage="budget"}``).
The bound on what the outage lets through unchecked: the calls of subjects limited only by an
override this process has not read since it started (or forgot); their spend still reaches the
ledger and the counters when the spool is replayed, and their next call after that is checked.

A settlement that cannot reach the database is spooled with its usage row (``CallContext.
reservation``, ``Reservation.to_json``) and settled in the row's replay transaction
(``replay_settlement``), idempotently: the reservation is released by the transaction that
deletes it, once. So minutes after an outage the counters equal the ledger and the open
reservations are the calls really in flight, without waiting for the reservation TTL.

Counter rows of closed windows are pruned by the sweep (``prune_counters``, hourly): a window
that ended at least ``BUDGET_RESERVATION_TTL_SECONDS`` ago (no reservation can still settle on
it), and a task's counter idle for ``TASK_COUNTER_IDLE`` with no reservation open. Nothing reads
a closed window's counter (``app.budgets.limits`` reads the current window, else the ledger's
rollups, which are never pruned), and a pruned task counter is made again from the ledger by the
task's next limited call, with the same spend (only its soft-limit warning may come again).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

import anyio
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from app.budgets import store
from app.budgets.override_signal import LimitsCache, override_signal
from app.budgets.store import CounterKey, CounterState, OverrideLimit
from app.core.config import Settings
from app.core.errors import BudgetExceededError, BudgetUnavailableError
from app.core.money import pico_to_usd, usd_to_pico
from app.core.prepared import Tx, write_gate
from app.models import BudgetScope, new_id
from app.notifications import outbox as notification_outbox  # issue 16: events in the outbox
from app.observability import LLM_BUDGET_BLOCKED, LLM_BUDGET_SOFT_LIMIT, TRACKING_ERRORS
from app.tracking.breaker import database_breaker, lost_a_race
from app.tracking.db_worker import DbWorker, batched
from app.tracking.pricing import PriceBook, TokenUsage
from app.tracking.record import UsageRecord
from app.tracking.tracker import CallContext, estimate_prompt_tokens, estimate_tokens
from app.tracking.write_process import LOST

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
RACE_RETRIES = 5  # a reservation PostgreSQL ended to break a deadlock is tried again
PRUNE_INTERVAL_SECONDS = 3600.0
# A task's counter unused this long, with no reservation open, is pruned (the ledger keeps its
# spend; the task's next limited call makes the counter again from it).
TASK_COUNTER_IDLE = timedelta(days=7)
KNOWN_LIMITED_MAX = 4096  # subjects remembered as limited, for deciding during an outage
# Scopes whose one window is their subject's whole life (``window_start`` 1970-01-01).
LIFETIME_SCOPES = frozenset({BudgetScope.TASK, BudgetScope.KEY})
_NO_DEFAULT = frozenset({BudgetScope.KEY})  # set per subject only, no BUDGET_* variable


def utcnow() -> datetime:
    return datetime.now(UTC)


# -- windows ----------------------------------------------------------------------------------


def window_start(scope: BudgetScope, day: date) -> date:
    if scope in LIFETIME_SCOPES:
        return TASK_WINDOW
    if scope is BudgetScope.USER_MONTHLY:
        return day.replace(day=1)
    return day


def window_end(scope: BudgetScope, start: date) -> date | None:
    """The first day after the window (exclusive end), None for a task or a key."""
    if scope in LIFETIME_SCOPES:
        return None
    if scope is BudgetScope.USER_MONTHLY:
        return (start.replace(day=28) + timedelta(days=4)).replace(day=1)
    return start + timedelta(days=1)


def counter_keys(
    task_id: str | None, user_id: str | None, day: date, key_id: str | None = None
) -> list[CounterKey]:
    """The counters a call of this task and user (made with this gateway key) on this UTC day
    is booked to, in lock order."""
    keys: list[CounterKey] = []
    if task_id:
        keys.append(CounterKey(BudgetScope.TASK, task_id, TASK_WINDOW))
    if user_id:
        keys.append(CounterKey(BudgetScope.USER_DAILY, user_id, day))
        keys.append(CounterKey(BudgetScope.USER_MONTHLY, user_id, day.replace(day=1)))
    keys.append(CounterKey(BudgetScope.GLOBAL_DAILY, "", day))
    if key_id:
        keys.append(CounterKey(BudgetScope.KEY, key_id, TASK_WINDOW))
    return keys


def key_of(context: CallContext) -> str | None:
    """The gateway key a call was made with (``app.gateway``'s context carries one)."""
    key_id = getattr(context, "key_id", None)
    return key_id if isinstance(key_id, str) else None


# -- limits -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limit:
    """The effective limit of one scope for one subject (None = unlimited)."""

    limit_pico: int | None
    soft_threshold: Decimal
    source: LimitSource
    # What a reservation's settlement carries of it (``Reservation.to_json``), made once: a
    # limit read from the database serves every call of its subject until an override changes.
    wire: tuple[int | None, str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "wire", (self.limit_pico, str(self.soft_threshold), self.source))


def default_limit_pico(settings: Settings, scope: BudgetScope) -> int | None:
    usd = {
        BudgetScope.TASK: settings.budget_task_max_usd,
        BudgetScope.USER_DAILY: settings.budget_user_daily_usd,
        BudgetScope.USER_MONTHLY: settings.budget_user_monthly_usd,
        BudgetScope.GLOBAL_DAILY: settings.budget_global_daily_usd,
    }.get(scope)  # a key's budget is set per key only
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
    """The environment's limit of each scope (a key's budget has no default)."""
    return {
        scope: effective_limit(settings, scope, None)
        for scope in BudgetScope
        if scope not in _NO_DEFAULT
    }


def resolve_limits(
    tx: Tx,
    settings: Settings,
    task_id: str | None,
    user_id: str | None,
    keys: list[CounterKey],
    defaults: Mapping[BudgetScope, Limit],
) -> dict[BudgetScope, Limit]:
    """Each key's limit: its override if an administrator set one, else ``defaults``."""
    key_id = next((k.subject_id for k in keys if k.scope is BudgetScope.KEY), None)
    overrides = store.read_override_limits(tx, task_id, user_id, key_id)
    return {
        k.scope: (
            (defaults.get(k.scope) or effective_limit(settings, k.scope, None))
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
    key_id: str | None = None  # the gateway key (its ``key`` counter is held too)

    def to_json(self) -> dict[str, Any]:
        """What the spool keeps of it (``from_json`` reads it back)."""
        data: dict[str, Any] = {name: getattr(self, name) for name in _RESERVATION_FIELDS}
        data["window_day"] = self.window_day.isoformat()
        data["limits"] = {scope.value: limit.wire for scope, limit in self.limits.items()}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Reservation:
        values = dict(data)
        values["window_day"] = date.fromisoformat(values["window_day"])
        values["limits"] = {
            BudgetScope(scope): Limit(pico, Decimal(threshold), source)
            for scope, (pico, threshold, source) in values["limits"].items()
        }
        return cls(**values)


_RESERVATION_FIELDS = tuple(
    f.name for f in dataclasses.fields(Reservation) if f.name not in ("window_day", "limits")
)


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    """A call's reservation asked of the writer process (``DatabaseBudgetGuard.request``)."""

    row_id: str
    task_id: str | None
    user_id: str | None
    key_id: str | None  # the gateway key (its ``key`` counter is held too)
    amount_pico: int  # the call's worst case
    now: datetime


REFUSED: Literal["refused"] = "refused"  # a scope refused: the tracking thread decides, records
UNAVAILABLE: Literal["unavailable"] = "unavailable"  # the writer process met an outage
ReserveAnswer = Reservation | Literal["refused", "unavailable"] | None


@dataclass
class _Caller(CallContext):
    """The context of a call asked of the writer process: who it is for, and its gateway key."""

    key_id: str | None = None


def _fixed(amount: int) -> Callable[[], int]:
    return lambda: amount


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
        self._breaker = database_breaker(engine)
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
        self._next_prune = 0.0
        self._known = _KnownLimited(any_default_limit(settings))

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

        Returns None (nothing to settle) only when the database is unavailable and no limit is
        known to apply. On the tracking thread, with other calls queued, it joins their batch.
        """
        now = self._clock()
        amount = _once(lambda: self.worst_case(model, request, context.provider).cost_pico)
        try:
            outcome: Reservation | BudgetExceededError | None = batched(
                self._reserve_batch, _Pending(context, now, amount)
            )
            if isinstance(outcome, BudgetExceededError):
                raise outcome
            if outcome is None:
                outcome = self._reserve_alone(context, amount, now)
            if outcome.held:
                context.reservation = outcome  # spooled with the call's row if need be
            return outcome
        except BudgetExceededError as exc:
            LLM_BUDGET_BLOCKED.labels(exc.scope).inc()
            # Notifications (issue 16): budget.exhausted, once per window; never raises.
            notification_outbox.record_budget_blocked(self._engine, exc, context.user_id)
            raise
        except SQLAlchemyError as exc:
            self._unavailable(exc, context)
            return None

    def _reserve_alone(
        self,
        context: CallContext,
        amount: Callable[[], int],
        now: datetime,
        row_id: str | None = None,
    ) -> Reservation:
        try:
            return self._reserve(context, amount, now, row_id)
        except BudgetExceededError:
            # A dead process's reservations may be what fills the scope: reclaim, retry once.
            if self.sweep_expired(now=now) == 0:
                raise
            return self._reserve(context, amount, now, row_id)

    def reserve_nowait(self, *, context: CallContext) -> Reservation | None:
        """The (empty) reservation of a call that no scope limits, when a read that never waits
        can tell (SQLite); None otherwise: then ``reserve`` decides.

        For event loops: the common case, nothing limited, costs no thread hop.
        """
        if self._breaker.is_open:
            return None  # ``reserve`` decides without the database
        day = self._clock().date()
        try:
            limits = self._limits(context, day, wait=False)
        except SQLAlchemyError:
            return None  # ``reserve`` will say whether calls may go ahead
        if limits is None or not _unlimited(limits):
            return None
        return self._unheld(context, day, limits)

    # -- reservations made in the writer process ------------------------------------------
    # An event loop's call that a limit may apply to asks the service's writer process for
    # its reservation (``reserve_in_writer``: ``AsyncLLMClient``, the gateway), so that the
    # transaction runs outside the service's GIL: ``request`` here, ``reserve_requests`` there
    # (the calls that arrived together in one transaction, as ``_reserve_batch`` does on the
    # tracking thread), ``adopt`` here again. Only a reservation taken or found unneeded comes
    # back as such: a refusal, a database failure or a lost answer send the call the tracking
    # thread's way (``reserve``), which decides again and records what it decides; a lost
    # answer first gives back what the writer process may have taken (``release``), as does a
    # reservation taken for a caller that stopped waiting.

    async def reserve_in_writer(
        self,
        worker: DbWorker,
        *,
        context: CallContext,
        model: str,
        request: Mapping[str, Any],
    ) -> Reservation | None:
        """On an event loop: the call's reservation, taken (or found unneeded) by ``worker``'s
        writer process; None: reserve on the tracking thread (``reserve``), which decides
        what the writer process did not (a refusal, an outage) and records it. For this
        guard's calls only when it is the runtime's (the child reserves with its settings)."""
        process = worker.process
        if process is None or not process.reserves:
            return None
        asked = self.request(context=context, model=model, request=request)
        if asked is None:
            return None
        # A caller cancelled while the child reserves (``asyncio.wait_for``): what the child
        # takes after that is given back on the tracking thread.
        waiter = process.reserve(
            asked, abandoned=lambda row_id: worker.call(lambda: self.give_back(row_id))
        )
        if waiter is None:
            return None
        with anyio.CancelScope(shield=True):
            answer = await waiter
            if answer == LOST:  # it may have been taken: give it back before reserving again
                await worker.call_async(lambda: self.give_back(asked.row_id))
                return None
        return self.adopt(context, answer)

    def request(
        self, *, context: CallContext, model: str, request: Mapping[str, Any]
    ) -> ReserveRequest | None:
        """The call's reservation as the writer process takes it: a new id, the worst case
        priced here; None while the breaker is open (``reserve`` decides without waiting)."""
        if self._breaker.is_open:
            return None
        return ReserveRequest(
            new_id(),
            context.task_id,
            context.user_id,
            key_of(context),
            self.worst_case(model, request, context.provider).cost_pico,
            self._clock(),
        )

    def reserve_requests(self, requests: Sequence[ReserveRequest]) -> list[ReserveAnswer]:
        """In the writer process: take the reservations of ``requests`` (one transaction for
        all, as ``_reserve_batch``; the calls it leaves alone, alone); per request its
        ``Reservation`` (held, or not needed), ``REFUSED``, ``UNAVAILABLE`` or None (the
        tracking thread should try)."""
        pending = [
            _Pending(
                _Caller(task_id=r.task_id, user_id=r.user_id, key_id=r.key_id),
                r.now,
                _fixed(r.amount_pico),
                r.row_id,
            )
            for r in requests
        ]
        try:
            results = self._reserve_batch(pending)
        except Exception:
            logger.exception("A batch of %d reservations failed; each alone", len(pending))
            results = [None] * len(pending)
        answers: list[ReserveAnswer] = []
        for call, result in zip(pending, results, strict=True):
            if result is None:
                try:
                    result = self._reserve_alone(call.context, call.amount, call.now, call.row_id)
                except BudgetExceededError as exc:
                    result = exc
                except SQLAlchemyError:
                    answers.append(UNAVAILABLE if self._breaker.is_open else None)
                    continue
                except Exception:
                    logger.exception("Reserving %s failed", call.row_id)
                    answers.append(None)
                    continue
            answers.append(REFUSED if isinstance(result, BudgetExceededError) else result)
        return answers

    def adopt(
        self, context: CallContext, answer: ReserveAnswer | Literal["lost"]
    ) -> Reservation | None:
        """Back in the service, without the database: the reservation the writer process took
        for ``context``'s call (None: the call goes the tracking thread's way)."""
        if isinstance(answer, Reservation):
            self._known.remember(context, answer.limits)
            if answer.held:
                context.reservation = answer  # spooled with the call's row if need be
            return answer
        if answer == UNAVAILABLE:
            # The writer process met the outage: the caller waited for one timeout there, and
            # the tracking thread decides at once rather than wait again.
            self._breaker.trip("the writer process could not reach the database")
        return None

    def release(self, reservation_id: str) -> bool:
        """Give back the reservation ``reservation_id`` if it was taken (a writer process that
        died before answering may have committed it): True if it was."""
        with self._breaker.transaction(self._gate) as tx:
            row = store.read_reservation(tx, reservation_id)
            if row is None:
                return False
            reservation = Reservation(
                row.id, row.amount_pico, row.task_id, row.user_id, row.window_day, {},
                key_id=row.key_id,
            )  # fmt: skip
            settle_on(tx, reservation, self._clock())
        return True

    def give_back(self, reservation_id: str) -> None:
        """``release``, for a caller that cannot wait for it or act on its failure: a
        reservation it could not give back (the database is down) expires after the TTL."""
        try:
            self.release(reservation_id)
        except Exception as exc:
            logger.warning("Could not give back reservation %s: %s", reservation_id, exc)

    def give_back_held(self, reservation: Reservation | None) -> None:
        """``give_back`` the reservation of a call that will not be made, if it holds one."""
        if reservation is not None and reservation.held:
            self.give_back(reservation.id)

    def _limits(
        self, context: CallContext, keys: list[CounterKey] | date, *, wait: bool
    ) -> dict[BudgetScope, Limit] | None:
        """The call's limits: reused while no override changed (SQLite, ``override_signal``),
        else read on the kept local connection when free, else (``wait``) on one from the pool;
        None when it would have to wait and ``wait`` is False. ``keys``: the call's counters,
        or its UTC day to make them from if the limits must be read."""
        key_id = key_of(context)
        subject = context.user_id if key_id is None else f"{context.user_id}\x00{key_id}"

        def read() -> dict[BudgetScope, Limit] | None:
            counters = (
                counter_keys(context.task_id, context.user_id, keys, key_id)
                if isinstance(keys, date)
                else keys
            )
            return self._read_limits(context, counters, wait)

        limits = self._limits_cache.get(context.task_id, subject, read)
        if limits is not None and not _unlimited(limits):
            # Reused: only the limited subjects' recency is news (``_KnownLimited`` keeps the
            # latest); what a read found unlimited it remembered when it read it.
            self._known.remember(context, limits)
        return limits

    def _read_limits(
        self, context: CallContext, keys: list[CounterKey], wait: bool
    ) -> dict[BudgetScope, Limit] | None:
        limits = self._read_limits_now(context, keys, wait)
        if limits is not None:
            self._known.remember(context, limits)
        return limits

    def _read_limits_now(
        self, context: CallContext, keys: list[CounterKey], wait: bool
    ) -> dict[BudgetScope, Limit] | None:
        with self._gate.local_read() as tx:
            if tx is not None:
                return resolve_limits(
                    tx, self._settings, context.task_id, context.user_id, keys, self._defaults
                )
        if not wait:
            return None
        with self._breaker.transaction(self._gate, write=False) as tx:
            return resolve_limits(
                tx, self._settings, context.task_id, context.user_id, keys, self._defaults
            )

    def _resolve_in(
        self, tx: Tx, context: CallContext, keys: list[CounterKey]
    ) -> dict[BudgetScope, Limit]:
        limits = resolve_limits(
            tx, self._settings, context.task_id, context.user_id, keys, self._defaults
        )
        self._known.remember(context, limits)
        return limits

    def _reserve(
        self,
        context: CallContext,
        worst_case: Callable[[], int],
        now: datetime,
        row_id: str | None = None,
    ) -> Reservation:
        self._breaker.check()  # open: decide now, without waiting for the database
        day = now.date()
        keys = counter_keys(context.task_id, context.user_id, day, key_of(context))
        # SQLite: the limits from a read first, and a write transaction only if one applies
        # (that transaction must start with its write). PostgreSQL: the limits are read in the
        # reservation's own transaction (one transaction, not two: each costs round trips),
        # which writes nothing if none applies.
        limits = self._limits(context, keys, wait=self._engine.dialect.name == "sqlite")
        if limits is not None and _unlimited(limits):
            return self._unheld(context, day, limits)
        self._sweep_if_due(now)  # reclaim what dead processes held, before taking more
        races = 0
        for attempt in range(3 + RACE_RETRIES):
            try:
                return self._hold(context, worst_case, keys, limits, now, row_id)
            except DBAPIError as exc:
                # PostgreSQL broke a deadlock by ending this transaction: another one (a usage
                # row's spend trigger in a batch of several tasks' rows, another process's
                # reservations) held a counter this one needed. Nothing was reserved: again.
                races += 1
                if not lost_a_race(exc) or races > RACE_RETRIES:
                    raise
                time.sleep(random.uniform(0.001, 0.01) * races)  # noqa: S311 - jitter, not a secret
            except store.CounterMissing:
                if attempt - races == 2:
                    raise
                # The first limited call of a window: make its counters from the ledger (in a
                # transaction of its own, holding no counter row), then try again.
                with self._breaker.transaction(self._gate) as tx:
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
        row_id: str | None = None,
    ) -> Reservation:
        """Take the reservation (``row_id``, else a new id) on every counter of the call, or on
        none of them."""
        day = now.date()
        # Raising inside the block rolls back every scope's increment made before it.
        with self._breaker.transaction(self._gate) as tx:
            if limits is None:
                limits = self._resolve_in(tx, context, keys)
                if _unlimited(limits):
                    return self._unheld(context, day, limits)  # nothing was written
            amount = worst_case()  # only now: a call nothing limits never needs it
            row = store.ReservationRow(
                row_id or new_id(), amount, context.task_id, context.user_id, day, key_of(context)
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
        return Reservation(
            row.id, amount, context.task_id, context.user_id, day, limits, key_id=row.key_id
        )

    # -- batches (the tracking thread) ----------------------------------------------------

    def _reserve_batch(
        self, pending: Sequence[_Pending]
    ) -> list[Reservation | BudgetExceededError | None]:
        """The reservations of calls queued together, in one transaction; per call its
        reservation, its refusal, or None (reserve it alone: its counters do not exist yet, the
        sweep freed room after it was refused, or the database failed)."""
        results: list[Reservation | BudgetExceededError | None] = [None] * len(pending)
        if self._breaker.is_open:
            return results
        plans: list[_Plan] = []
        sqlite = self._engine.dialect.name == "sqlite"
        try:
            for index, call in enumerate(pending):
                day = call.now.date()
                keys = counter_keys(
                    call.context.task_id, call.context.user_id, day, key_of(call.context)
                )
                limits = self._limits(call.context, keys, wait=sqlite)
                if limits is not None and _unlimited(limits):
                    results[index] = self._unheld(call.context, day, limits)
                else:
                    plans.append(_Plan(index, call, keys, limits))
            if not plans:
                return results
            self._sweep_if_due(max(call.now for call in pending))
            with self._breaker.transaction(self._gate) as tx:
                for plan in plans:
                    if plan.limits is None:  # PostgreSQL: read in the transaction
                        plan.limits = self._resolve_in(tx, plan.call.context, plan.keys)
                    if _unlimited(plan.limits):
                        day = plan.call.now.date()
                        results[plan.index] = self._unheld(plan.call.context, day, plan.limits)
                        plan.outcome = _DONE
                    else:
                        plan.amount = plan.call.amount()
                self._hold_many(tx, [p for p in plans if p.outcome is None])
            new_window = [p for p in plans if p.outcome is _ALONE]
            if new_window:
                # The first calls of a window (a new task, a new day): make all their counters
                # in one transaction, then take their reservations in one more.
                now = max(call.now for call in pending)
                with self._breaker.transaction(self._gate) as tx:
                    fresh = {key for plan in new_window for key in plan.keys}
                    store.seed_counters(tx, sorted(fresh, key=lambda k: k.lock_order), now)
                for plan in new_window:
                    plan.outcome = None
                with self._breaker.transaction(self._gate) as tx:
                    self._hold_many(tx, new_window)
        except SQLAlchemyError as exc:
            logger.warning("A batch of %d reservations failed; each alone: %s", len(plans), exc)
            return [r if isinstance(r, Reservation) else None for r in results]
        refused = [p for p in plans if isinstance(p.outcome, BudgetExceededError)]
        # A dead process's reservations may be what fills a scope: reclaim, and the refused
        # calls try again alone.
        retry = bool(refused) and self._sweep_refused(max(call.now for call in pending))
        for plan in plans:
            if plan.outcome is _DONE:
                continue
            if plan.outcome is None:
                context = plan.call.context
                results[plan.index] = Reservation(
                    plan.row_id,
                    plan.amount,
                    context.task_id,
                    context.user_id,
                    plan.call.now.date(),
                    plan.limits or {},
                    key_id=key_of(context),
                )
            elif isinstance(plan.outcome, BudgetExceededError) and not retry:
                results[plan.index] = plan.outcome
        return results

    def _sweep_refused(self, now: datetime) -> bool:
        try:
            return self.sweep_expired(now=now) > 0
        except SQLAlchemyError:
            return False

    def _hold_many(self, tx: Tx, plans: list[_Plan]) -> None:
        """Take each plan's reservation on all its counters or none, counters in lock order.

        Every counter row is updated in ``lock_order`` across the whole batch (as a call alone
        does for its own), so two batches, or a batch and a call, never wait for each other in
        a cycle. A plan refused on a counter gives back what it took on the earlier ones, which
        this transaction already holds.
        """
        by_key: dict[CounterKey, list[_Plan]] = {}
        for plan in plans:
            for key in plan.keys:
                by_key.setdefault(key, []).append(plan)
        for key in sorted(by_key, key=lambda k: k.lock_order):
            alive = [plan for plan in by_key[key] if plan.outcome is None]
            if len(alive) > 1 and self._take_together(tx, key, alive):
                continue
            for plan in alive:
                assert plan.limits is not None
                limit = plan.limits[key.scope].limit_pico
                try:
                    if store.try_reserve(tx, key, plan.amount, limit, plan.call.now):
                        plan.taken.append(key)
                        continue
                    state = store.read_counter(tx, key) or CounterState()
                    plan.outcome = self._exceeded(key, limit or 0, state, plan.amount)
                except store.CounterMissing:
                    plan.outcome = _ALONE  # a new window: the call alone makes its counters
                if plan.taken:
                    give_back = dict.fromkeys(plan.taken, (0, -plan.amount))
                    store.apply_counter_deltas(tx, give_back, plan.call.now)
        rows = []
        for plan in plans:
            if plan.outcome is None:
                context, now = plan.call.context, plan.call.now
                plan.row_id = plan.call.row_id or new_id()
                row = store.ReservationRow(
                    plan.row_id,
                    plan.amount,
                    context.task_id,
                    context.user_id,
                    now.date(),
                    key_of(context),
                )
                rows.append((row, now, now + self._ttl))
        store.insert_reservations(tx, rows)

    @staticmethod
    def _take_together(tx: Tx, key: CounterKey, plans: list[_Plan]) -> bool:
        """All the plans' amounts on ``key`` in one conditional UPDATE, if their sum fits (then
        each would have fitted on its own); False: take them one by one."""
        limits = {plan.limits[key.scope].limit_pico for plan in plans if plan.limits is not None}
        if len(limits) != 1 or any(plan.amount <= 0 for plan in plans):
            return False  # limits read apart disagree, or unpriced calls (their own rule)
        total = sum(plan.amount for plan in plans)
        try:
            if not store.try_reserve(tx, key, total, limits.pop(), plans[0].call.now):
                return False
        except store.CounterMissing:
            return False
        for plan in plans:
            plan.taken.append(key)
        return True

    @staticmethod
    def _exceeded(
        key: CounterKey, limit_pico: int, state: CounterState, amount: int
    ) -> BudgetExceededError:
        return BudgetExceededError(
            scope=key.scope.value,
            subject_id=key.subject_id or None,
            window_start=None if key.scope in LIFETIME_SCOPES else key.window_start,
            window_end=window_end(key.scope, key.window_start),
            limit_usd=pico_to_usd(limit_pico),
            spent_usd=pico_to_usd(state.spent_pico),
            reserved_usd=pico_to_usd(state.reserved_pico),
            requested_usd=pico_to_usd(amount),
        )

    def _unavailable(self, exc: SQLAlchemyError, context: CallContext) -> None:
        TRACKING_ERRORS.labels("budget").inc()
        if self._known.may_be_limited(context):
            raise BudgetUnavailableError(
                "Budgets cannot be checked (the database is unavailable); the call was not made."
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
            with self._breaker.transaction(self._gate) as own:
                released, after, warned = settle_on(
                    own, reservation, self._clock(), record.cost_pico_usd
                )
        else:
            released, after, warned = settle_on(
                tx, reservation, self._clock(), record.cost_pico_usd
            )
        if not released:
            _warn_expired(reservation.id)
        for key in warned:
            _warn_soft_limit(key, reservation.limits[key.scope], after[key])

    # -- expiry and pruning ---------------------------------------------------------------

    def sweep_expired(self, *, now: datetime | None = None) -> int:
        """Release the reservations whose expiry has passed; how many were released."""
        now = now or self._clock()
        total = 0
        while True:
            with self._breaker.connection() as conn:
                expired = store.delete_expired_reservations(conn, now, SWEEP_BATCH)
                deltas: dict[CounterKey, tuple[int, int]] = {}
                for row in expired:
                    for key in counter_keys(row.task_id, row.user_id, row.window_day, row.key_id):
                        deltas[key] = (0, deltas.get(key, (0, 0))[1] - row.amount_pico)
                store.apply_counter_deltas(Tx.of(conn), deltas, now)
            if expired:
                logger.warning("Released %d expired budget reservations", len(expired))
            total += len(expired)
            if len(expired) < SWEEP_BATCH:
                return total

    def prune_counters(self, *, now: datetime | None = None) -> int:
        """Delete the counters nothing reads any more (see the module docstring); how many."""
        now = now or self._clock()
        with self._breaker.connection() as conn:
            pruned = store.prune_counters(
                conn,
                {scope: window_start(scope, (now - self._ttl).date()) for scope in BudgetScope},
                task_idle_before=now - TASK_COUNTER_IDLE,
            )
        if pruned:
            logger.info("Pruned %d budget counters of closed windows", pruned)
        return pruned

    def _sweep_if_due(self, now: datetime) -> None:
        if time.monotonic() < self._next_sweep or not self._sweep_lock.acquire(blocking=False):
            return
        try:
            self._next_sweep = time.monotonic() + SWEEP_INTERVAL_SECONDS
            self.sweep_expired(now=now)
            if time.monotonic() >= self._next_prune:
                self._next_prune = time.monotonic() + PRUNE_INTERVAL_SECONDS
                self.prune_counters(now=now)
        finally:
            self._sweep_lock.release()


# -- settling ---------------------------------------------------------------------------------


def settle_on(
    tx: Tx, reservation: Reservation, now: datetime, spent_pico: int = 0
) -> tuple[bool, dict[CounterKey, CounterState], list[CounterKey]]:
    """Release ``reservation`` in ``tx``: (released, the counters after, the soft limits crossed).

    The spend itself is booked by the ledger: inserting the usage row adds its cost to the
    counters that exist (the trigger of revision 0005), in the same transaction - except a
    gateway key's counter (the ledger does not record keys): the call's ``spent_pico`` is booked
    on it here, once, released or not. Releasing is idempotent: only the transaction that
    deletes the reservation row gives its amount back.
    """
    released = store.delete_reservation(tx, reservation.id)
    deltas: dict[CounterKey, tuple[int, int]] = {}
    if released:
        keys = counter_keys(reservation.task_id, reservation.user_id, reservation.window_day)
        deltas = dict.fromkeys(keys, (0, -reservation.amount_pico))
    if reservation.key_id:
        key = CounterKey(BudgetScope.KEY, reservation.key_id, TASK_WINDOW)
        deltas[key] = (spent_pico, -reservation.amount_pico if released else 0)
    after = store.apply_counter_deltas(tx, deltas, now)
    warned = [
        key
        for key, state in after.items()
        if _crossed_soft_limit(reservation.limits.get(key.scope), state)
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


def replay_settlement(tx: Tx, record: UsageRecord, settlement: Mapping[str, Any]) -> None:
    """Settle a spooled row's reservation in the replay's transaction (``UsageWriter``)."""
    announce_settled(settle_data(tx, record, settlement))


@dataclass(frozen=True, slots=True)
class Settled:
    """What settling a reservation given as data did, for the process that made the call to
    log and count (the writer process settles; the service's metrics are the caller's)."""

    reservation_id: str
    released: bool
    warned: tuple[tuple[CounterKey, Limit, CounterState], ...] = ()


def settle_data(tx: Tx, record: UsageRecord, settlement: Mapping[str, Any]) -> Settled:
    """Settle the reservation ``settlement`` (``Reservation.to_json``) in ``tx`` with its
    call's ``record``; the soft limits crossed are returned, not announced."""
    reservation = Reservation.from_json(settlement)
    released, after, warned = settle_on(tx, reservation, utcnow(), record.cost_pico_usd)
    return Settled(
        reservation.id,
        released,
        tuple((key, reservation.limits[key.scope], after[key]) for key in warned),
    )


def announce_settled(settled: Settled) -> None:
    """Log and count what ``settle_data`` did (``DatabaseBudgetGuard.settle`` does both)."""
    if not settled.released:
        _warn_expired(settled.reservation_id)
    for key, limit, state in settled.warned:
        _warn_soft_limit(key, limit, state)


def _warn_expired(reservation_id: str) -> None:
    logger.warning(
        "Reservation %s had expired before its call settled; "
        "BUDGET_RESERVATION_TTL_SECONDS is shorter than that call.",
        reservation_id,
    )


def _crossed_soft_limit(limit: Limit | None, state: CounterState) -> bool:
    if limit is None or limit.limit_pico is None or state.soft_warned:
        return False
    return state.spent_pico >= limit.soft_threshold * limit.limit_pico


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


# -- the batch's bookkeeping ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Pending:
    """A call waiting for its reservation (on the tracking thread, or in the writer process)."""

    context: CallContext
    now: datetime
    amount: Callable[[], int]  # its worst case, in pico-dollars (computed when first asked)
    row_id: str | None = None  # the reservation's id, when the caller chose it


_DONE = object()  # no reservation needed after all (nothing limits the call)
_ALONE = object()  # the call reserves alone (its counters are missing)


@dataclass(slots=True)
class _Plan:
    index: int
    call: _Pending
    keys: list[CounterKey]
    limits: Mapping[BudgetScope, Limit] | None
    amount: int = 0
    taken: list[CounterKey] = dataclasses.field(default_factory=list)
    outcome: object | None = None  # None: held; _DONE, _ALONE or the BudgetExceededError
    row_id: str = ""


class _KnownLimited:
    """Which subjects this process last saw limited: what an outage must not let through."""

    def __init__(self, default_limit: bool) -> None:
        self._default_limit = default_limit
        self._global = False
        self._subjects: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, context: CallContext, limits: Mapping[BudgetScope, Limit]) -> None:
        scopes_of: dict[tuple[str, str], bool] = {}
        for scope, limit in limits.items():
            if scope is BudgetScope.GLOBAL_DAILY:
                self._global = limit.limit_pico is not None
                continue
            subject = _subject(scope, context)
            if subject is not None:
                scopes_of[subject] = scopes_of.get(subject, False) or limit.limit_pico is not None
        with self._lock:
            for subject, limited in scopes_of.items():
                if limited:
                    self._subjects[subject] = None
                    self._subjects.move_to_end(subject)
                else:
                    self._subjects.pop(subject, None)
            while len(self._subjects) > KNOWN_LIMITED_MAX:
                self._subjects.popitem(last=False)

    def may_be_limited(self, context: CallContext) -> bool:
        if self._default_limit or self._global:
            return True
        with self._lock:
            return any(
                (kind, subject) in self._subjects
                for kind, subject in (("task", context.task_id), ("user", context.user_id))
                if subject
            )


def _subject(scope: BudgetScope, context: CallContext) -> tuple[str, str] | None:
    """The remembered subject a scope's limit belongs to (scopes other than task and user
    ones are remembered by their scope name and the call's user, conservatively)."""
    if scope is BudgetScope.TASK:
        return ("task", context.task_id) if context.task_id else None
    return ("user", context.user_id) if context.user_id else None


def _once(compute: Callable[[], int]) -> Callable[[], int]:
    """``compute``, run on the first call only (a retried reservation reuses its worst case);
    cheaper than ``functools.cache`` made afresh for every call."""
    done: list[int] = []

    def value() -> int:
        if not done:
            done.append(compute())
        return done[0]

    return value
