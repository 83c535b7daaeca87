"""Budgets enforced by LLMClient before each call, on SQLite and PostgreSQL.

Calls go over real HTTP to the simulator, whose scripted usage makes each call's real cost equal
to its reservation, so "a cap that admits exactly 10" is exact. ``sim.state.stats()["requests"]``
counts the calls that reached the provider.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select

from app.budgets import limits as budget_limits
from app.budgets import override_signal
from app.budgets import store as budgets_store
from app.budgets.guard import (
    PROMPT_OVERHEAD_TOKENS,
    DatabaseBudgetGuard,
    Limit,
    Reservation,
    counter_keys,
    worst_case_tokens,
)
from app.budgets.store import CounterKey, CounterState
from app.core.config import Settings
from app.core.errors import BudgetExceededError, BudgetUnavailableError
from app.core.money import usd_to_pico
from app.core.runtime import Runtime
from app.models import BudgetScope, LLMUsage
from app.simulator.config import ScriptRule
from app.simulator.server import SimulatorServer
from app.tracking.llm_client import AsyncLLMClient, LLMClient
from app.tracking.record import UsageRecord
from app.tracking.tracker import CallContext

MODEL = "budget-model"
PRICES = {MODEL: {"input_mtok": "1", "output_mtok": "2"}}
MAX_TOKENS = 50
MESSAGES = [{"role": "user", "content": "budgeted call"}]


def today() -> date:
    """The UTC day now: read per use, so a run that crosses midnight reads today's windows."""
    return datetime.now(UTC).date()


def request_of(messages: list[dict[str, str]] = MESSAGES) -> dict[str, Any]:
    return {"messages": messages, "model": MODEL, "max_tokens": MAX_TOKENS}


def call_cost_pico() -> int:
    """The worst case of one MESSAGES call: (prompt x $1 + 50 x $2) per million tokens."""
    tokens = worst_case_tokens(request_of(), 4096)
    assert tokens.completion_tokens == MAX_TOKENS
    return usd_to_pico(Decimal(tokens.prompt_tokens + 2 * MAX_TOKENS) / 1_000_000)


def script_exact_usage(sim: SimulatorServer, *, extra_prompt_tokens: int = 0, **reply: Any) -> None:
    """Every MODEL call is billed exactly its worst case (plus ``extra_prompt_tokens``)."""
    prompt = worst_case_tokens(request_of(), 4096).prompt_tokens + extra_prompt_tokens
    usage = {"prompt_tokens": prompt, "completion_tokens": MAX_TOKENS, "cached_tokens": 0}
    rule = {"match_model": MODEL, "reply": {"content": "x", "usage": usage, **reply}}
    sim.state.add_scripts([ScriptRule.model_validate(rule)])


def counter(
    runtime: Runtime, scope: BudgetScope, subject: str = "", day: date | None = None
) -> Any:
    key = next(k for k in counter_keys("t", "u", day or today()) if k.scope is scope)
    key = CounterKey(scope, subject, key.window_start)
    with runtime.engine.connect() as conn:
        return budgets_store.read_counter(conn, key) or CounterState()


def open_reservations(runtime: Runtime) -> int:
    with runtime.engine.connect() as conn:
        return budgets_store.count_open_reservations(conn)


def usage_statuses(runtime: Runtime) -> list[str]:
    with runtime.session_factory() as session:
        return sorted(session.scalars(select(LLMUsage.status)))


def blocked_metric(scope: str) -> float:
    return REGISTRY.get_sample_value("llm_budget_blocked_total", {"scope": scope}) or 0.0


def set_limit(runtime: Runtime, scope: BudgetScope, subject: str, usd: Decimal | None) -> None:
    with runtime.session_factory() as session, session.begin():
        budget_limits.set_override(
            session,
            runtime.settings,
            scope,
            subject,
            limit_usd=usd,
            soft_threshold=None,
            updated_by="test",
        )


@pytest.fixture
def budget_runtime(runtime_factory: Callable[..., Runtime]) -> Callable[..., Runtime]:
    def build(**overrides: Any) -> Runtime:
        return runtime_factory(price_overrides=PRICES, **overrides)

    return build


# -- the cap holds under concurrency ----------------------------------------------------------


def test_200_concurrent_threads_against_a_cap_of_10_calls_make_exactly_10(
    budget_runtime: Callable[..., Runtime], sim: SimulatorServer
) -> None:
    cost = call_cost_pico()
    cap_usd = Decimal(10 * cost) / 10**12
    runtime = budget_runtime(budget_global_daily_usd=cap_usd)
    script_exact_usage(sim)
    blocked_before = blocked_metric("global_daily")
    start = threading.Barrier(200)

    def one_call(i: int) -> str:
        client = LLMClient(task_id=f"task-{i}", user_id=f"user-{i % 7}", runtime=runtime)
        start.wait()
        try:
            client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS)
        except BudgetExceededError as exc:
            return f"blocked by {exc.scope}"
        return "ok"

    with ThreadPoolExecutor(max_workers=200) as pool:
        outcomes = list(pool.map(one_call, range(200)))

    assert outcomes.count("ok") == 10 and outcomes.count("blocked by global_daily") == 190
    assert sim.state.stats()["requests"] == 10
    assert counter(runtime, BudgetScope.GLOBAL_DAILY) == CounterState(10 * cost, 0, True)
    assert open_reservations(runtime) == 0
    assert usage_statuses(runtime) == ["blocked"] * 190 + ["success"] * 10
    assert blocked_metric("global_daily") - blocked_before == 190


async def test_200_concurrent_async_calls_against_a_user_cap_of_10_calls_make_exactly_10(
    budget_runtime: Callable[..., Runtime], sim: SimulatorServer
) -> None:
    cost = call_cost_pico()
    runtime = budget_runtime()
    set_limit(runtime, BudgetScope.USER_DAILY, "alice", Decimal(10 * cost) / 10**12)
    script_exact_usage(sim)

    async def one_call(i: int) -> str:
        client = AsyncLLMClient(task_id=f"task-{i}", user_id="alice", runtime=runtime)
        try:
            await client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS)
        except BudgetExceededError as exc:
            return f"blocked by {exc.scope} of {exc.subject_id}"
        return "ok"

    outcomes = await asyncio.gather(*(one_call(i) for i in range(200)))

    assert outcomes.count("ok") == 10 and outcomes.count("blocked by user_daily of alice") == 190
    assert sim.state.stats()["requests"] == 10
    assert counter(runtime, BudgetScope.USER_DAILY, "alice").spent_pico == 10 * cost
    assert counter(runtime, BudgetScope.USER_MONTHLY, "alice").spent_pico == 10 * cost
    assert counter(runtime, BudgetScope.GLOBAL_DAILY) == CounterState(10 * cost, 0, False)
    assert open_reservations(runtime) == 0


def _process_worker(settings: Settings, calls: int, barrier: Any, results: Any) -> None:
    """One process of the multi-process test: its own Runtime, ``calls`` calls on 10 threads.

    10 threads, not 50: four processes' connection pools must fit PostgreSQL's 100 connections.
    """
    runtime = Runtime.build(settings, start_background=False)
    try:
        barrier.wait(timeout=120)

        def one_call(i: int) -> str:
            client = LLMClient(task_id=f"p-task-{i}", user_id="bob", runtime=runtime)
            try:
                client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS)
            except BudgetExceededError:
                return "blocked"
            return "ok"

        with ThreadPoolExecutor(max_workers=10) as pool:
            results.put(list(pool.map(one_call, range(calls))))
    finally:
        runtime.close()


def test_200_calls_from_4_processes_against_a_cap_of_10_calls_make_exactly_10(
    database_url: str, sim: SimulatorServer, tmp_path: Path
) -> None:
    cost = call_cost_pico()
    settings = Settings(
        database_url=database_url,
        openai_base_url=sim.base_url,
        openai_api_key="sk-test-budget",  # type: ignore[arg-type]
        openai_max_retries=0,
        auto_migrate=False,
        spool_dir=tmp_path / "spool",
        price_overrides=PRICES,  # type: ignore[arg-type]
        budget_user_monthly_usd=Decimal(10 * cost) / 10**12,
    )
    script_exact_usage(sim)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    workers = [
        ctx.Process(target=_process_worker, args=(settings, 50, barrier, results)) for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    outcomes = [outcome for _ in workers for outcome in results.get(timeout=300)]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0

    assert outcomes.count("ok") == 10 and outcomes.count("blocked") == 190
    assert sim.state.stats()["requests"] == 10
    runtime = Runtime.build(settings, start_background=False)
    try:
        assert counter(runtime, BudgetScope.USER_MONTHLY, "bob") == CounterState(10 * cost, 0, True)
        assert open_reservations(runtime) == 0
    finally:
        runtime.close()


# -- settle: the real cost replaces the reservation -------------------------------------------


def test_provider_error_releases_the_reservation(
    budget_runtime: Callable[..., Runtime], sim: SimulatorServer
) -> None:
    runtime = budget_runtime(budget_task_max_usd=Decimal("1"))
    sim.state.schedule_fault("500")

    with pytest.raises(openai.InternalServerError):
        LLMClient(task_id="t-err", runtime=runtime).chat_completion(
            messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS
        )

    assert counter(runtime, BudgetScope.TASK, "t-err") == CounterState(0, 0, False)
    assert open_reservations(runtime) == 0
    assert usage_statuses(runtime) == ["error"]


async def test_cancelled_async_call_releases_its_reservation(
    budget_runtime: Callable[..., Runtime], sim: SimulatorServer
) -> None:
    runtime = budget_runtime(budget_task_max_usd=Decimal("1"))
    script_exact_usage(sim, latency_ms=30_000)
    client = AsyncLLMClient(task_id="t-cancel", runtime=runtime)
    call = asyncio.create_task(
        client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS)
    )
    for _ in range(500):
        if sim.state.stats()["requests"] == 1:
            break
        await asyncio.sleep(0.01)
    assert counter(runtime, BudgetScope.TASK, "t-cancel").reserved_pico == call_cost_pico()

    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    assert counter(runtime, BudgetScope.TASK, "t-cancel") == CounterState(0, 0, False)
    assert open_reservations(runtime) == 0


def test_cost_above_the_reservation_is_booked_in_full(
    budget_runtime: Callable[..., Runtime], sim: SimulatorServer
) -> None:
    runtime = budget_runtime(budget_task_max_usd=Decimal(1))  # a limit: the task has a counter
    script_exact_usage(sim, extra_prompt_tokens=1000)

    LLMClient(task_id="t-over", runtime=runtime).chat_completion(
        messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS
    )

    # The estimate missed 1000 prompt tokens ($0.001): spend is the real cost, not the estimate.
    real = call_cost_pico() + usd_to_pico(Decimal("0.001"))
    assert counter(runtime, BudgetScope.TASK, "t-over") == CounterState(real, 0, False)
    with runtime.session_factory() as session:
        assert session.scalar(select(LLMUsage.cost_pico_usd)) == real


def test_a_call_over_the_limit_is_blocked_recorded_and_explained(
    budget_runtime: Callable[..., Runtime], sim: SimulatorServer
) -> None:
    cost = call_cost_pico()
    runtime = budget_runtime(budget_task_max_usd=Decimal(cost + cost // 2) / 10**12)
    script_exact_usage(sim)
    client = LLMClient(task_id="t-cap", user_id="carol", runtime=runtime)
    client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS)

    with pytest.raises(BudgetExceededError) as caught:
        client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS)

    err = caught.value
    assert (err.scope, err.subject_id, err.status_code) == ("task", "t-cap", 402)
    assert err.limit_usd == Decimal(cost + cost // 2) / 10**12
    assert err.spent_usd == Decimal(cost) / 10**12
    assert err.remaining_usd == Decimal(cost // 2) / 10**12
    assert err.requested_usd == Decimal(cost) / 10**12
    assert err.extra["window_start"] is None
    assert err.extra["limit_usd"] == format(err.limit_usd, "f")
    assert sim.state.stats()["requests"] == 1
    assert usage_statuses(runtime) == ["blocked", "success"]
    with runtime.session_factory() as session:
        blocked = session.scalars(select(LLMUsage).where(LLMUsage.status == "blocked")).one()
    assert blocked.error_type == "BudgetExceededError" and "task of t-cap" in (
        blocked.error_message or ""
    )
    # The refusal rolled back every scope it had already reserved on.
    assert counter(runtime, BudgetScope.USER_DAILY, "carol") == CounterState(cost, 0, False)


def test_an_unpriced_model_reserves_nothing_but_is_refused_once_the_budget_is_spent(
    budget_runtime: Callable[..., Runtime], sim: SimulatorServer
) -> None:
    cost = call_cost_pico()
    runtime = budget_runtime(budget_task_max_usd=Decimal(cost) / 10**12)
    script_exact_usage(sim)
    client = LLMClient(task_id="t-unpriced", runtime=runtime)

    client.chat_completion(messages=MESSAGES, model="mystery-model-b", max_tokens=MAX_TOKENS)
    assert counter(runtime, BudgetScope.TASK, "t-unpriced") == CounterState(0, 0, False)
    client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS)
    with pytest.raises(BudgetExceededError):
        client.chat_completion(messages=MESSAGES, model="mystery-model-b", max_tokens=MAX_TOKENS)

    assert sim.state.stats()["requests"] == 2


def test_a_zero_limit_override_refuses_every_call_and_null_lifts_the_default(
    budget_runtime: Callable[..., Runtime], sim: SimulatorServer
) -> None:
    runtime = budget_runtime(budget_user_daily_usd=Decimal(0))
    script_exact_usage(sim)
    with pytest.raises(BudgetExceededError):
        LLMClient(user_id="dave", runtime=runtime).chat_completion(messages=MESSAGES, model=MODEL)

    set_limit(runtime, BudgetScope.USER_DAILY, "dave", None)
    LLMClient(user_id="dave", runtime=runtime).chat_completion(messages=MESSAGES, model=MODEL)

    assert sim.state.stats()["requests"] == 1


def test_soft_threshold_warns_once_per_window(
    budget_runtime: Callable[..., Runtime], sim: SimulatorServer, caplog: pytest.LogCaptureFixture
) -> None:
    cost = call_cost_pico()
    runtime = budget_runtime(budget_task_max_usd=Decimal(10 * cost) / 10**12)
    script_exact_usage(sim)
    client = LLMClient(task_id="t-soft", runtime=runtime)
    before = REGISTRY.get_sample_value("llm_budget_soft_limit_total", {"scope": "task"}) or 0.0

    with caplog.at_level(logging.WARNING, logger="app.budgets.guard"):
        for _ in range(7):
            client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS)
        assert not [r for r in caplog.records if "of its limit" in r.getMessage()]
        for _ in range(3):
            client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS)

    warnings = [r.getMessage() for r in caplog.records if "of its limit" in r.getMessage()]
    assert len(warnings) == 1 and "task of t-soft reached 80%" in warnings[0]
    after = REGISTRY.get_sample_value("llm_budget_soft_limit_total", {"scope": "task"})
    assert after == before + 1


# -- reservations of a dead process expire ----------------------------------------------------


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_a_dead_process_reservation_stops_blocking_once_expired(
    budget_runtime: Callable[..., Runtime], sim: SimulatorServer
) -> None:
    cost = call_cost_pico()
    runtime = budget_runtime(budget_task_max_usd=Decimal(cost) / 10**12)
    script_exact_usage(sim)
    clock = Clock(datetime.now(UTC))
    guard = DatabaseBudgetGuard(runtime.engine, runtime.settings, runtime.price_book, clock=clock)
    # A process reserves and dies before its call settles.
    guard.reserve(context=CallContext(task_id="t-dead"), model=MODEL, request=request_of())
    client = LLMClient(task_id="t-dead", runtime=runtime, budget=guard)
    with pytest.raises(BudgetExceededError):
        client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS)

    clock.now += timedelta(seconds=runtime.settings.budget_reservation_ttl_seconds + 1)
    client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS)

    assert sim.state.stats()["requests"] == 1
    assert counter(runtime, BudgetScope.TASK, "t-dead") == CounterState(cost, 0, True)
    assert open_reservations(runtime) == 0


def test_sweep_releases_only_expired_reservations_and_a_late_settle_still_books_spend(
    budget_runtime: Callable[..., Runtime],
) -> None:
    runtime = budget_runtime(budget_task_max_usd=Decimal(1))  # a limit: reservations are held
    clock = Clock(datetime.now(UTC))
    guard = DatabaseBudgetGuard(runtime.engine, runtime.settings, runtime.price_book, clock=clock)
    ctx = CallContext(task_id="t-sweep", user_id="erin")
    old = guard.reserve(context=ctx, model=MODEL, request=request_of())
    clock.now += timedelta(seconds=runtime.settings.budget_reservation_ttl_seconds - 10)
    fresh = guard.reserve(context=ctx, model=MODEL, request=request_of())
    assert isinstance(old, Reservation) and isinstance(fresh, Reservation)
    clock.now += timedelta(seconds=20)

    assert guard.sweep_expired() == 1
    assert guard.sweep_expired() == 0
    cost = call_cost_pico()
    assert counter(runtime, BudgetScope.TASK, "t-sweep") == CounterState(0, cost, False)

    late = UsageRecord(
        request_id="late", model=MODEL, status="success", task_id="t-sweep", cost_pico_usd=7
    )
    # As the client does it: the row (which books the spend) and the settlement together.
    assert runtime.writer.write(late, also=lambda tx: guard.settle(old, late, tx))
    assert counter(runtime, BudgetScope.TASK, "t-sweep") == CounterState(7, cost, False)


def test_a_call_nothing_limits_touches_no_counter_and_a_later_limit_counts_its_spend(
    budget_runtime: Callable[..., Runtime], sim: SimulatorServer
) -> None:
    runtime = budget_runtime()
    script_exact_usage(sim)
    cost = call_cost_pico()
    client = LLMClient(task_id="t-free", user_id="gus", runtime=runtime)
    guard = runtime.budget_guard

    context = CallContext(task_id="t-free", user_id="gus")
    reservation = guard.reserve(context=context, model=MODEL, request=request_of())
    assert not reservation.held and open_reservations(runtime) == 0
    client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS)

    with runtime.engine.connect() as conn:
        for key in counter_keys("t-free", "gus", today()):
            assert budgets_store.read_counter(conn, key) is None, key
    # What the limits API shows comes from the ledger until a counter exists.
    with runtime.session_factory() as session:
        daily, monthly = budget_limits.user_status(session, runtime.settings, "gus")
    assert (daily.spent_pico, monthly.spent_pico) == (cost, cost)
    # A limit set now counts what was spent before it: one more call would pass it.
    set_limit(runtime, BudgetScope.TASK, "t-free", Decimal(cost * 3 // 2) / 10**12)
    with pytest.raises(BudgetExceededError) as refused:
        client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS)
    assert refused.value.scope == "task" and sim.state.stats()["requests"] == 1
    assert counter(runtime, BudgetScope.TASK, "t-free") == CounterState(cost, 0, False)


def test_an_event_loop_learns_without_waiting_only_that_nothing_limits_a_call(
    budget_runtime: Callable[..., Runtime],
) -> None:
    runtime = budget_runtime()
    guard = runtime.budget_guard
    context = CallContext(task_id="t-loop", user_id="ivy")
    local = runtime.engine.dialect.name == "sqlite"  # PostgreSQL is a round trip: never inline

    free = guard.reserve_nowait(context=context)
    set_limit(runtime, BudgetScope.USER_MONTHLY, "ivy", Decimal(5))
    limited = guard.reserve_nowait(context=context)

    assert (free is not None and not free.held) if local else free is None
    assert limited is None  # a limit applies: ``reserve`` must take the reservation
    assert open_reservations(runtime) == 0


def test_rows_replayed_from_the_spool_book_their_spend_on_the_counters(
    budget_runtime: Callable[..., Runtime],
) -> None:
    # An outage: calls went on, their rows were spooled and their settlements failed. When the
    # rows land, their spend lands on the counters with them (the ledger books it), and the
    # reservations the failed settlements left are released by the sweep: counted once each.
    runtime = budget_runtime(budget_user_daily_usd=Decimal(1))
    guard = runtime.budget_guard
    context = CallContext(task_id="t-outage", user_id="jo")
    held = guard.reserve(context=context, model=MODEL, request=request_of())
    records = [
        UsageRecord(
            request_id=f"spooled-{i}",
            model=MODEL,
            status="success",
            task_id="t-outage",
            user_id="jo",
            cost_pico_usd=1_000 + i,
        )
        for i in range(3)
    ]
    for record in records:
        runtime.writer.spool.append(record)

    assert runtime.writer.replay_spool() == 3
    spent = sum(r.cost_pico_usd for r in records)
    assert counter(runtime, BudgetScope.USER_DAILY, "jo") == CounterState(
        spent, held.amount_pico, False
    )
    runtime.writer.replay_spool()  # a second replay changes nothing
    assert counter(runtime, BudgetScope.USER_DAILY, "jo").spent_pico == spent


def test_a_counter_made_while_calls_run_counts_each_call_exactly_once(
    budget_runtime: Callable[..., Runtime], sim: SimulatorServer
) -> None:
    # 40 unlimited calls of one user run while another thread sets that user a daily limit and
    # makes calls under it: the counter starts from the ledger while rows keep landing. Every
    # call's spend must end up in the counter once: the seeding holds back the rollup writers
    # (PostgreSQL) or shares SQLite's single writer.
    cost = call_cost_pico()
    runtime = budget_runtime()
    script_exact_usage(sim)

    def free_call(i: int) -> None:
        LLMClient(task_id=f"t-seed-{i}", user_id="hana", runtime=runtime).chat_completion(
            messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        running = [pool.submit(free_call, i) for i in range(40)]
        set_limit(runtime, BudgetScope.USER_DAILY, "hana", Decimal(1000))
        limited = [pool.submit(free_call, 100 + i) for i in range(10)]
        for future in [*running, *limited]:
            future.result()

    assert counter(runtime, BudgetScope.USER_DAILY, "hana") == CounterState(50 * cost, 0, False)
    assert open_reservations(runtime) == 0


# -- windows ----------------------------------------------------------------------------------


def test_a_call_running_past_midnight_is_spent_in_the_day_the_ledger_books_it(
    budget_runtime: Callable[..., Runtime],
) -> None:
    runtime = budget_runtime(  # limits on every scope: the reservation is held on each
        budget_task_max_usd=Decimal(1),
        budget_user_daily_usd=Decimal(1),
        budget_user_monthly_usd=Decimal(1),
        budget_global_daily_usd=Decimal(1),
    )
    clock = Clock(datetime(2031, 1, 31, 23, 59, 59, tzinfo=UTC))
    guard = DatabaseBudgetGuard(runtime.engine, runtime.settings, runtime.price_book, clock=clock)
    context = CallContext(task_id="t-night", user_id="frank")
    reservation = guard.reserve(context=context, model=MODEL, request=request_of())
    assert isinstance(reservation, Reservation)
    clock.now = datetime(2031, 2, 1, 0, 0, 5, tzinfo=UTC)
    record = UsageRecord(
        request_id="night",
        model=MODEL,
        status="success",
        task_id="t-night",
        user_id="frank",
        cost_pico_usd=42,
        timestamp=clock.now,
    )

    # As the client does it: the row and the settlement in one transaction.
    assert runtime.writer.write(record, also=lambda tx: guard.settle(reservation, record, tx))

    jan31, feb1 = date(2031, 1, 31), date(2031, 2, 1)
    assert counter(runtime, BudgetScope.USER_DAILY, "frank", jan31) == CounterState(0, 0, False)
    assert counter(runtime, BudgetScope.USER_MONTHLY, "frank", jan31) == CounterState(0, 0, False)
    assert counter(runtime, BudgetScope.TASK, "t-night") == CounterState(42, 0, False)
    # February's counters do not exist yet; the first reservation there starts them from the
    # ledger, which booked the call on February 1st.
    held = guard.reserve(context=context, model=MODEL, request=request_of())
    assert isinstance(held, Reservation)
    for scope, subject in (
        (BudgetScope.USER_DAILY, "frank"),
        (BudgetScope.USER_MONTHLY, "frank"),
        (BudgetScope.GLOBAL_DAILY, ""),
    ):
        state = counter(runtime, scope, subject, feb1)
        assert (state.spent_pico, state.reserved_pico) == (42, held.amount_pico), scope


def test_worst_case_takes_max_completion_tokens_times_n_and_the_default_cap() -> None:
    messages = [{"role": "system", "content": "x" * 40}, {"role": "user", "content": "y" * 8}]
    prompt = (4 + 10) + (4 + 2) + PROMPT_OVERHEAD_TOKENS

    assert worst_case_tokens({"messages": messages}, 4096).completion_tokens == 4096
    assert worst_case_tokens({"messages": messages}, 4096).prompt_tokens == prompt
    both = {"messages": messages, "max_tokens": 10, "max_completion_tokens": 30, "n": 3}
    assert worst_case_tokens(both, 4096).completion_tokens == 90
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert worst_case_tokens({"messages": messages, "tools": tools}, 1).prompt_tokens > prompt


# -- the database is unreachable --------------------------------------------------------------


def _unreachable_runtime(sim: SimulatorServer, tmp_path: Path, **overrides: Any) -> Runtime:
    settings = Settings(
        database_url="postgresql+psycopg://postgres@127.0.0.1:9/unreachable",
        openai_base_url=sim.base_url,
        openai_api_key="sk-test-budget",  # type: ignore[arg-type]
        openai_max_retries=0,
        auto_migrate=False,
        spool_dir=tmp_path / "spool",
        **overrides,
    )
    return Runtime.build(settings, start_background=False)


def test_unreachable_store_refuses_calls_when_a_default_limit_is_set(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    runtime = _unreachable_runtime(sim, tmp_path, budget_global_daily_usd=Decimal(100))
    try:
        with pytest.raises(BudgetUnavailableError):
            LLMClient(runtime=runtime).chat_completion(messages=MESSAGES, model="gpt-4o-mini")
    finally:
        runtime.close()
    assert sim.state.stats()["requests"] == 0


def test_unreachable_store_lets_calls_through_when_no_default_limit_is_set(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    runtime = _unreachable_runtime(sim, tmp_path)
    try:
        LLMClient(runtime=runtime).chat_completion(messages=MESSAGES, model="gpt-4o-mini")
    finally:
        runtime.close()
    assert sim.state.stats()["requests"] == 1


def test_settings_refuse_a_reservation_ttl_shorter_than_a_call() -> None:
    with pytest.raises(ValueError, match="BUDGET_RESERVATION_TTL_SECONDS"):
        Settings(openai_timeout_seconds=900, budget_reservation_ttl_seconds=600)
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        Settings(budget_user_daily_usd=Decimal("-1"))
    assert Settings(budget_task_max_usd="").budget_task_max_usd is None  # type: ignore[arg-type]


def test_counter_keys_follow_the_lock_order() -> None:
    keys = counter_keys("t", "u", date(2031, 5, 17), key_id="k")
    assert [k.scope for k in keys] == list(BudgetScope)
    assert keys == sorted(keys, key=lambda k: k.lock_order)
    assert keys[2].window_start == date(2031, 5, 1)
    assert replace(keys[0], subject_id="z").lock_order < keys[1].lock_order


def test_the_per_call_override_lookup_searches_the_primary_key_not_the_table(
    budget_runtime: Callable[..., Runtime],
) -> None:
    # Every capped task leaves a task-scope override, so the table grows with the tasks run:
    # the lookup each call makes must stay an index search.
    runtime = budget_runtime()
    if runtime.engine.dialect.name != "sqlite":
        pytest.skip("the plan is checked on SQLite")
    compiled = budgets_store._OVERRIDE_LIMITS.compiled(runtime.engine.dialect)
    with runtime.engine.connect() as conn:
        plan = conn.exec_driver_sql(
            "EXPLAIN QUERY PLAN " + compiled.sql,
            tuple(compiled.params({"s_task": "t", "s_user": "u"})),
        ).all()
    details = [row[-1] for row in plan]
    assert not any(d.startswith("SCAN") for d in details), details
    assert any("USING INDEX" in d for d in details), details


# -- limits kept between calls (SQLite) -----------------------------------------------------


def test_a_limit_set_by_another_process_applies_to_the_very_next_call(
    budget_runtime: Callable[..., Runtime], sim: SimulatorServer
) -> None:
    script_exact_usage(sim)
    here, there = budget_runtime(), budget_runtime()  # two guards, each with its own memory
    client = LLMClient(task_id="t-elsewhere", user_id="kim", runtime=here)
    client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS)

    set_limit(there, BudgetScope.TASK, "t-elsewhere", Decimal(0))  # signalled once committed

    with pytest.raises(BudgetExceededError):
        client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS)
    assert sim.state.stats()["requests"] == 1


def test_an_override_written_by_hand_applies_within_the_reuse_limit(
    budget_runtime: Callable[..., Runtime], sim: SimulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(override_signal, "LIMITS_REUSE_SECONDS", 0.2)
    script_exact_usage(sim)
    runtime = budget_runtime()
    client = LLMClient(task_id="t-by-hand", user_id="lee", runtime=runtime)
    client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS)

    with runtime.engine.begin() as conn:  # SQL by hand: no signal
        budgets_store.upsert_override(
            conn,
            BudgetScope.TASK,
            "t-by-hand",
            limit_pico=0,
            soft_threshold=None,
            updated_by="dba",
            now=datetime.now(UTC),
        )
    time.sleep(0.3)

    with pytest.raises(BudgetExceededError):
        client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS)
    assert sim.state.stats()["requests"] == 1


def test_a_reservation_survives_the_spool_and_the_writer_process_unchanged() -> None:
    """``to_json`` (made from each limit's cached ``wire`` form) reads back to an equal
    reservation through JSON (the spool) and pickle (the writer process's socket)."""
    import json
    import pickle

    limits = {
        BudgetScope.TASK: Limit(usd_to_pico(Decimal("1.25")), Decimal("0.85"), "override"),
        BudgetScope.USER_DAILY: Limit(None, Decimal("0.8"), "none"),
        BudgetScope.GLOBAL_DAILY: Limit(usd_to_pico(Decimal("100")), Decimal("0.80"), "default"),
    }
    held = Reservation("r1", 12_345, "t", "u", date(2026, 12, 1), limits, key_id="k")
    for copy in (
        json.loads(json.dumps(held.to_json())),
        pickle.loads(pickle.dumps(held.to_json())),
    ):
        again = Reservation.from_json(copy)
        assert again == held
        assert {
            s: (lim.limit_pico, lim.soft_threshold, lim.source) for s, lim in again.limits.items()
        } == {s: (lim.limit_pico, lim.soft_threshold, lim.source) for s, lim in limits.items()}
    assert pickle.loads(pickle.dumps(limits[BudgetScope.TASK])).wire == (
        usd_to_pico(Decimal("1.25")),
        "0.85",
        "override",
    )


async def test_a_caller_cancelled_while_the_thread_reserves_leaves_nothing_reserved(
    budget_runtime: Callable[..., Runtime], sim: SimulatorServer
) -> None:
    """``asyncio.wait_for`` gives up on a call whose reservation the tracking thread has yet to
    take (the thread is busy): the thread still takes it, and gives it back."""
    from tests.budgets.test_outage import books
    from tests.support.reliability import wait_until

    runtime = budget_runtime(budget_user_daily_usd=Decimal(1000), tracking_writer="thread")
    script_exact_usage(sim)
    gate = threading.Event()
    busy = runtime.db_worker.call(lambda: gate.wait(30))  # the tracking thread is busy
    client = AsyncLLMClient(task_id="cancelled", user_id="impatient", runtime=runtime)
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(
                client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS), 0.3
            )
    finally:
        gate.set()
    assert busy.result(timeout=10)

    def given_back() -> bool:
        final = books(runtime.engine)  # the counters made by the reservation, nothing held
        return bool(final.counters) and set(final.counters.values()) == {(0, 0)}

    assert await asyncio.to_thread(wait_until, given_back, 10), books(runtime.engine)
    assert open_reservations(runtime) == 0 and sim.state.stats()["requests"] == 0
