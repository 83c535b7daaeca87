"""Budgets through a database outage: settlements spooled with their rows and replayed with
them, so the counters equal the ledger and no reservation stays open soon after recovery.

PostgreSQL is cut and restored through the reliability suite's loopback proxy
(``PostgresOutage``); SQLite is locked by an exclusive transaction of another connection
(``SqliteOutage``). Calls go over HTTP to the simulator, each held there 300 ms so that many are
in flight when the outage begins.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import Engine, func, select

from app.budgets import store as budgets_store
from app.budgets.guard import DatabaseBudgetGuard, Reservation
from app.core.errors import BudgetUnavailableError
from app.core.runtime import Runtime
from app.models import BudgetCounter, BudgetScope, LLMUsage
from app.simulator.server import SimulatorServer
from app.tracking.breaker import database_breaker
from app.tracking.llm_client import AsyncLLMClient
from app.tracking.record import UsageRecord
from app.tracking.tracker import CallContext
from tests.budgets.test_budgets import (
    MAX_TOKENS,
    MESSAGES,
    MODEL,
    PRICES,
    request_of,
    script_exact_usage,
    set_limit,
)
from tests.conftest import make_settings
from tests.support.reliability import DatabaseOutage, PostgresOutage, SqliteOutage, wait_until

USER = "outage-user"
WORKERS = 24


def outage_of(database_url: str) -> DatabaseOutage:
    """PostgreSQL stopped (through the loopback proxy), or the SQLite file locked."""
    if database_url.startswith("postgresql"):
        return PostgresOutage(database_url)
    return SqliteOutage(database_url)


@pytest.fixture
def outage_runtime(
    database_url: str, sim: SimulatorServer, tmp_path: Path
) -> Iterator[tuple[Runtime, DatabaseOutage]]:
    outage = outage_of(database_url)
    settings = make_settings(
        outage.service_url,
        sim.base_url,
        tmp_path,
        price_overrides=PRICES,
        budget_user_daily_usd=Decimal(1000),  # never reached: every call reserves and settles
        sqlite_busy_timeout_seconds=1.0,
        spool_replay_interval_seconds=30.0,  # only the breaker's recovery replays in time
    )
    runtime = Runtime.build(settings)  # with its spool replayer
    process = runtime.db_worker.process
    assert process is not None and process.reserves
    # Started, as the service starts it: it takes the event loop's reservations and rows.
    assert process.start(wait=60), "the writer process did not start"
    try:
        yield runtime, outage
    finally:
        outage.end()
        runtime.close()
        outage.close()


@dataclass
class Books:
    """The counters against a from-scratch sum of the ledger."""

    counters: dict[tuple[str, str], tuple[int, int]]
    ledger: dict[tuple[str, str], int]
    open_reservations: int

    @property
    def balanced(self) -> bool:
        spent = {key: state[0] for key, state in self.counters.items()}
        reserved = [state[1] for state in self.counters.values()]
        return spent == self.ledger and not any(reserved) and self.open_reservations == 0


def books(engine: Engine) -> Books:
    with engine.connect() as conn:
        counters = {
            (scope, subject): (int(spent), int(reserved))
            for scope, subject, spent, reserved in conn.execute(
                select(
                    BudgetCounter.scope,
                    BudgetCounter.subject_id,
                    BudgetCounter.spent_pico_usd,
                    BudgetCounter.reserved_pico_usd,
                )
            )
        }
        ledger: dict[tuple[str, str], int] = {}
        cost = func.coalesce(func.sum(LLMUsage.cost_pico_usd), 0)
        for task, spent in conn.execute(select(LLMUsage.task_id, cost).group_by(LLMUsage.task_id)):
            ledger[("task", task)] = int(spent)
        for user, spent in conn.execute(select(LLMUsage.user_id, cost).group_by(LLMUsage.user_id)):
            ledger[("user_daily", user)] = ledger[("user_monthly", user)] = int(spent)
        ledger[("global_daily", "")] = int(conn.scalar(select(cost)) or 0)
        return Books(counters, ledger, budgets_store.count_open_reservations(conn))


def spooled_total() -> float:
    return REGISTRY.get_sample_value("llm_usage_spooled_total") or 0.0


async def test_after_an_outage_the_counters_equal_the_ledger_within_seconds(
    outage_runtime: tuple[Runtime, DatabaseOutage], sim: SimulatorServer
) -> None:
    runtime, outage = outage_runtime
    script_exact_usage(sim, latency_ms=300)
    outcomes: dict[str, int] = {}
    stop = asyncio.Event()

    async def worker(i: int) -> None:
        client = AsyncLLMClient(task_id=f"outage-task-{i}", user_id=USER, runtime=runtime)
        while not stop.is_set():
            try:
                await client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS)
                kind = "ok"
            except BudgetUnavailableError:
                kind = "refused: database unavailable"
                await asyncio.sleep(0.05)
            outcomes[kind] = outcomes.get(kind, 0) + 1

    async def until(condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.02)

    spooled_before = spooled_total()
    requests_before = sim.state.stats()["requests"]
    workers = [asyncio.create_task(worker(i)) for i in range(WORKERS)]
    await until(lambda: sim.state.stats()["requests"] - requests_before >= WORKERS, "calls")
    outage.begin()  # calls are in flight: their rows and settlements meet the outage
    await until(
        lambda: runtime.writer.spool.pending() > 0 and "refused: database unavailable" in outcomes,
        "the outage to be met",
    )
    outage.end()
    recovered = time.monotonic()
    await asyncio.sleep(1.0)  # limited calls keep running after recovery, as they would
    stop.set()
    await asyncio.gather(*workers)

    balanced = await asyncio.to_thread(
        wait_until, lambda: books(runtime.engine).balanced, 10 - (time.monotonic() - recovered)
    )
    final = books(runtime.engine)
    assert balanced, final
    assert outcomes["ok"] > WORKERS and outcomes["refused: database unavailable"] > 0
    assert spooled_total() - spooled_before >= 1  # in-flight calls' rows went to the spool
    assert runtime.writer.spool.pending() == 0
    assert database_breaker(runtime.engine).state == "closed"
    with runtime.engine.connect() as conn:
        successes = conn.scalar(
            select(func.count()).select_from(LLMUsage).where(LLMUsage.status == "success")
        )
    assert successes == outcomes["ok"]  # every returned call has its one row
    process = runtime.db_worker.process
    assert process is not None and process.answered > WORKERS  # it took reservations


def test_a_spooled_settlement_is_replayed_with_its_row_exactly_once(
    database_url: str, sim: SimulatorServer, tmp_path: Path
) -> None:
    settings = make_settings(
        database_url, sim.base_url, tmp_path, price_overrides=PRICES, budget_user_daily_usd=1
    )
    runtime = Runtime.build(settings, start_background=False)
    try:
        guard = runtime.budget_guard
        assert isinstance(guard, DatabaseBudgetGuard)
        context = CallContext(task_id="spooled-task", user_id="spooled-user")
        held = guard.reserve(context=context, model=MODEL, request=request_of())
        assert isinstance(held, Reservation) and context.reservation is held
        record = UsageRecord(
            request_id="spooled-with-settlement",
            model=MODEL,
            status="success",
            task_id="spooled-task",
            user_id="spooled-user",
            cost_pico_usd=held.amount_pico - 7,
        )
        line = Reservation.from_json(held.to_json())
        assert line == held
        runtime.writer.spool_row(record, held.to_json())
        runtime.writer.spool_row(record, held.to_json())  # spooled twice (a retried write)

        assert runtime.writer.replay_spool() == 2
        after = books(runtime.engine)
        assert after.balanced, after
        assert after.counters[("user_daily", "spooled-user")] == (record.cost_pico_usd, 0)

        runtime.writer.spool_row(record, held.to_json())  # and once more, after the replay
        assert runtime.writer.replay_spool() == 1
        assert books(runtime.engine) == after
    finally:
        runtime.close()


def test_while_the_database_is_down_a_call_with_a_known_limit_is_refused_at_once(
    database_url: str, sim: SimulatorServer, tmp_path: Path
) -> None:
    # No default limit: only an override, which this process read before the outage.
    outage = outage_of(database_url)
    settings = make_settings(
        outage.service_url,
        sim.base_url,
        tmp_path,
        price_overrides=PRICES,
        sqlite_busy_timeout_seconds=1.0,
    )
    runtime = Runtime.build(settings, start_background=False)
    try:
        set_limit(runtime, BudgetScope.USER_DAILY, "limited", Decimal(1))
        guard = runtime.budget_guard
        assert guard is not None
        limited = CallContext(task_id="t1", user_id="limited")
        free = CallContext(task_id="t2", user_id="free")
        for context in (limited, free):
            reservation = guard.reserve(context=context, model=MODEL, request=request_of())
            assert reservation is not None
        outage.begin()
        # The first call meets the outage (one timeout) and opens the breaker.
        with pytest.raises(BudgetUnavailableError):
            guard.reserve(context=limited, model=MODEL, request=request_of())
        assert database_breaker(runtime.engine).is_open
        started = time.perf_counter()
        with pytest.raises(BudgetUnavailableError, match="database is unavailable"):
            guard.reserve(context=limited, model=MODEL, request=request_of())
        # A user this process saw unlimited goes ahead unmetered (the documented bound).
        assert guard.reserve(context=free, model=MODEL, request=request_of()) is None
        assert time.perf_counter() - started < 1.0  # no database wait while the breaker is open
    finally:
        outage.end()
        runtime.close()
        outage.close()
