"""Async calls queued together reserve in one transaction, and the cap still holds: spend plus
reserved never passes it, whatever mix of batches, threads and processes take reservations."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from app.core.config import Settings
from app.core.errors import BudgetExceededError
from app.core.runtime import Runtime
from app.models import BudgetScope
from app.simulator.server import SimulatorServer
from app.tracking.llm_client import AsyncLLMClient, LLMClient
from tests.budgets.test_budgets import (
    MAX_TOKENS,
    MESSAGES,
    MODEL,
    PRICES,
    call_cost_pico,
    counter,
    open_reservations,
    script_exact_usage,
    set_limit,
)
from tests.conftest import make_settings

CAP_CALLS = 10


class CapWatch:
    """Reads the capped counter over and over while calls run; remembers the worst it saw."""

    def __init__(self, runtime: Runtime, user: str) -> None:
        self._runtime, self._user = runtime, user
        self.worst = 0
        self.reads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CapWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            state = counter(self._runtime, BudgetScope.USER_DAILY, self._user)
            self.worst = max(self.worst, state.spent_pico + state.reserved_pico)
            self.reads += 1
            self._stop.wait(0.002)


async def _async_burst(
    runtime: Runtime, user: str, calls: int, prefix: str, *, own_http: bool = False
) -> list[str]:
    """``calls`` concurrent calls; ``own_http``: through an SDK client of this event loop's own
    (an HTTP connection pool belongs to one event loop; the runtime's is shared). The runtime's
    writer process is started first: it takes the reservations (in batches of its own)."""
    process = runtime.db_worker.process
    assert process is not None and process.reserves
    assert process.start(wait=60), "the writer process did not start"
    http = (
        openai.AsyncOpenAI(api_key="sk-test", base_url=runtime.llm_endpoint, max_retries=0)
        if own_http
        else None
    )

    async def one(i: int) -> str:
        client = AsyncLLMClient(
            task_id=f"{prefix}-{i}", user_id=user, runtime=runtime, openai_client=http
        )
        try:
            await client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS)
        except BudgetExceededError:
            return "blocked"
        return "ok"

    return list(await asyncio.gather(*(one(i) for i in range(calls))))


def test_batches_threads_and_sync_calls_together_never_pass_the_cap(
    runtime_factory: Callable[..., Runtime], sim: SimulatorServer
) -> None:
    runtime = runtime_factory(price_overrides=PRICES)
    cost = call_cost_pico()
    set_limit(runtime, BudgetScope.USER_DAILY, "capped", Decimal(CAP_CALLS * cost) / 10**12)
    script_exact_usage(sim, latency_ms=20)
    start = threading.Barrier(4)

    def event_loop_thread(n: int) -> list[str]:  # async calls: batched on the tracking thread
        start.wait()
        return asyncio.run(_async_burst(runtime, "capped", 60, f"loop{n}", own_http=True))

    def sync_thread(n: int) -> list[str]:  # sync calls: each reserves alone, in its thread
        start.wait()
        out = []
        for i in range(20):
            client = LLMClient(task_id=f"sync{n}-{i}", user_id="capped", runtime=runtime)
            try:
                client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS)
                out.append("ok")
            except BudgetExceededError:
                out.append("blocked")
        return out

    with CapWatch(runtime, "capped") as watch, ThreadPoolExecutor(4) as pool:
        runs = [pool.submit(event_loop_thread, n) for n in range(2)]
        runs += [pool.submit(sync_thread, n) for n in range(2)]
        outcomes = [o for run in runs for o in run.result(timeout=300)]

    assert watch.reads > 0 and watch.worst <= CAP_CALLS * cost
    assert outcomes.count("ok") == CAP_CALLS and len(outcomes) == 160
    process = runtime.db_worker.process
    assert process is not None and process.answered == 120  # every async call asked it
    assert sim.state.stats()["requests"] == CAP_CALLS
    final = counter(runtime, BudgetScope.USER_DAILY, "capped")
    assert (final.spent_pico, final.reserved_pico) == (CAP_CALLS * cost, 0)
    assert open_reservations(runtime) == 0


def _process_burst(settings: Settings, calls: int, barrier: Any, results: Any) -> None:
    runtime = Runtime.build(settings, start_background=False)
    try:
        barrier.wait(timeout=120)
        outcomes = asyncio.run(_async_burst(runtime, "proc-capped", calls, f"p{id(runtime)}"))
        assert runtime.db_worker.process is not None
        results.put((outcomes, runtime.db_worker.process.answered))
    finally:
        runtime.close()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_batches_in_three_processes_never_pass_the_cap(
    database_url: str, sim: SimulatorServer, tmp_path: Path
) -> None:
    cost = call_cost_pico()
    settings = make_settings(
        database_url,
        sim.base_url,
        tmp_path,
        price_overrides=PRICES,
        budget_user_daily_usd=Decimal(CAP_CALLS * cost) / 10**12,
    )
    script_exact_usage(sim, latency_ms=20)
    watcher = Runtime.build(settings, start_background=False)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [
        ctx.Process(target=_process_burst, args=(settings, 60, barrier, results)) for _ in range(3)
    ]
    try:
        with CapWatch(watcher, "proc-capped") as watch:
            for proc in procs:
                proc.start()
            reports = [results.get(timeout=300) for _ in procs]
            outcomes = [o for run, _ in reports for o in run]
            for proc in procs:
                proc.join(timeout=60)
                assert proc.exitcode == 0
        assert watch.reads > 0 and watch.worst <= CAP_CALLS * cost
        assert outcomes.count("ok") == CAP_CALLS and len(outcomes) == 180
        assert [answered for _, answered in reports] == [60, 60, 60]  # writer processes took them
        assert sim.state.stats()["requests"] == CAP_CALLS
        final = counter(watcher, BudgetScope.USER_DAILY, "proc-capped")
        assert (final.spent_pico, final.reserved_pico) == (CAP_CALLS * cost, 0)
        assert open_reservations(watcher) == 0
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        watcher.close()
