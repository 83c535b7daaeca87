"""Counters of closed windows are pruned without changing any answer or any limit decision;
the SQLite override signal stays small and still signals every change."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from app.budgets import limits as budget_limits
from app.budgets.guard import DatabaseBudgetGuard, Reservation
from app.budgets.override_signal import MAX_SIGNAL_BYTES, OverrideSignal
from app.core.errors import BudgetExceededError
from app.core.runtime import Runtime
from app.models import BudgetCounter, BudgetScope
from app.tracking.record import UsageRecord
from app.tracking.tracker import CallContext
from app.usage import queries as usage_queries
from tests.budgets.test_budgets import MODEL, PRICES, request_of, set_limit

NOW = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
USERS = ("alice", "bob")


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def spend(runtime: Runtime, guard: DatabaseBudgetGuard, context: CallContext, cost: int) -> None:
    """One call as the client makes it: reserve, then the row and the settlement together."""
    held = guard.reserve(context=context, model=MODEL, request=request_of())
    assert isinstance(held, Reservation)
    record = UsageRecord(
        request_id=f"{context.task_id}-{guard._clock().isoformat()}",
        model=MODEL,
        status="success",
        task_id=context.task_id,
        user_id=context.user_id,
        cost_pico_usd=cost,
        timestamp=guard._clock(),
    )
    assert runtime.writer.write(record, also=lambda tx: guard.settle(held, record, tx))


def answers(runtime: Runtime, subjects: list[tuple[BudgetScope, str]]) -> dict[Any, Any]:
    """Everything the limits API, the console and the usage reports say about the subjects."""
    found: dict[Any, Any] = {}
    with runtime.session_factory() as session:
        for scope, subject in subjects:
            status = budget_limits.scope_status(session, runtime.settings, scope, subject, now=NOW)
            found[(scope, subject)] = status
    with runtime.engine.connect() as conn:
        for user in USERS:
            found[("user_spend", user)] = usage_queries.user_spend(conn, user, 60)
        for scope, subject in subjects:
            if scope is BudgetScope.TASK:
                found[("task_spend", subject)] = usage_queries.task_spend(conn, subject)
    return found


def counters(runtime: Runtime) -> int:
    with runtime.engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(BudgetCounter)) or 0)


def test_pruning_keeps_every_answer_and_every_limit_decision(
    runtime_factory: Callable[..., Runtime],
) -> None:
    runtime = runtime_factory(
        price_overrides=PRICES,
        budget_user_daily_usd=Decimal(1),
        budget_user_monthly_usd=Decimal(5),
        budget_global_daily_usd=Decimal(100),
        budget_task_max_usd=Decimal(1),
    )
    clock = Clock()
    guard = DatabaseBudgetGuard(runtime.engine, runtime.settings, runtime.price_book, clock=clock)
    amount = guard.worst_case(MODEL, request_of()).cost_pico
    tasks: list[str] = []
    for days_ago in (45, 10, 3, 1, 0):  # closed months, closed days, an idle task, today
        clock.now = NOW - timedelta(days=days_ago)
        for user in USERS:
            task = f"task-{user}-{days_ago}"
            tasks.append(task)
            spend(runtime, guard, CallContext(task_id=task, user_id=user), amount - days_ago)
    # An idle task that still holds a reservation (its process died): its counter is kept.
    clock.now = NOW - timedelta(days=10)
    guard.reserve(context=CallContext("task-held", "alice"), model=MODEL, request=request_of())
    tasks.append("task-held")
    # A task whose cap is spent: its next call must be refused, pruned or not.
    set_limit(runtime, BudgetScope.TASK, "task-bob-10", Decimal(amount - 10) / 10**12)
    clock.now = NOW

    subjects = [(BudgetScope.GLOBAL_DAILY, "")]
    subjects += [(s, u) for u in USERS for s in (BudgetScope.USER_DAILY, BudgetScope.USER_MONTHLY)]
    subjects += [(BudgetScope.TASK, task) for task in tasks]
    before = answers(runtime, subjects)
    counted = counters(runtime)

    pruned = guard.prune_counters(now=NOW)

    assert pruned > 0 and counters(runtime) == counted - pruned
    assert answers(runtime, subjects) == before
    with runtime.engine.connect() as conn:
        kept = set(conn.execute(select(BudgetCounter.scope, BudgetCounter.subject_id)))
    assert (BudgetScope.TASK.value, "task-alice-10") not in kept  # idle, nothing open
    assert (BudgetScope.TASK.value, "task-held") in kept  # idle, a reservation open
    assert (BudgetScope.TASK.value, "task-alice-1") in kept  # used yesterday
    with runtime.engine.connect() as conn:
        days = {
            day
            for (day,) in conn.execute(
                select(BudgetCounter.window_start).where(
                    BudgetCounter.scope == BudgetScope.USER_DAILY.value
                )
            )
        }
    assert days == {NOW.date()}  # closed days pruned (the TTL, 1 h, has passed for them)

    # Every limit decision is what the answers before pruning predict, on pruned counters too.
    for task in tasks:
        user = "bob" if "bob" in task else "alice"
        status = before[(BudgetScope.TASK, task)]
        fits = status.remaining_pico is None or status.remaining_pico >= amount
        for scope in (BudgetScope.USER_DAILY, BudgetScope.USER_MONTHLY):
            remaining = before[(scope, user)].remaining_pico
            fits = fits and (remaining is None or remaining >= amount)
        try:
            held = guard.reserve(context=CallContext(task, user), model=MODEL, request=request_of())
        except BudgetExceededError:
            decided = False
        else:
            decided = True
            assert isinstance(held, Reservation)
            free = UsageRecord(request_id=f"free-{task}", model=MODEL, status="error")
            guard.settle(held, free)  # give it back: the next decision starts from the same
        assert decided is fits, task


def test_the_override_signal_stays_small_and_signals_every_change(tmp_path: Path) -> None:
    signal = OverrideSignal(tmp_path / "asa.db.limits")
    last = signal.version()
    for _ in range(3 * MAX_SIGNAL_BYTES):
        signal.announce()
        version = signal.version()
        assert version != last  # every change is visible to a reader that kept the version
        last = version
        assert signal.path is not None and signal.path.stat().st_size <= MAX_SIGNAL_BYTES
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "asa.db.limits"]
    assert leftovers == []
