"""Scenario 6: a budget race across several worker processes on PostgreSQL.

Four processes, each with its own ``Runtime`` (engine, budget guard, usage writer), wait at a
barrier and then start all their calls at once through ``AsyncLLMClient``, every call for a
different user and task, so that the one row they all contend for is the global daily counter:
its cap pays for ``CAP_CALLS`` calls at their worst case. Two calls in three are billed exactly
their worst case, one in three fails with a 500 (its reservation is released, cost 0), and every
answer takes 200 ms, so that the admitted calls hold their reservations while the rest race.

Counted: the committed ``spent + reserved`` of the global counter, sampled every few
milliseconds during the race, never passes the cap (a guard that checks and then reserves in two
steps fails here), nor does the final spend; nothing is left reserved and no reservation is
open; the counter's spend equals the ledger's cost; every call has exactly one row whose status
is what its caller saw; the simulator received exactly the calls that were admitted.

CI: 4 processes x 60 calls against a cap of 40. Full (``ASA_RELIABILITY_FULL=1``): 4 processes x
250 calls (1,000 at once) against a cap of 150.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, select

from app.budgets.guard import worst_case_tokens
from app.core.money import usd_to_pico
from app.models import BudgetCounter
from tests.support import race as rel_race
from tests.support.reliability import Ledger, SimulatorProcess, forkserver, service_env, size

PROCESSES = 4
CALLS_PER_PROCESS = size(60, 250)
CAP_CALLS = size(40, 150)  # worst-case calls the cap pays for
DB_THREADS = 8  # per process
MODEL = "race-model"
PRICES = '{"race-model": {"input_mtok": "1", "output_mtok": "2"}}'
MAX_TOKENS = 50
KINDS = ("full", "full", "e500")


def _worst_case() -> tuple[int, int]:
    """(prompt tokens, picodollars) of one race call at its worst case."""
    messages = [{"role": "user", "content": "[full] [r00000-0] race"}]
    tokens = worst_case_tokens({"messages": messages, "max_tokens": MAX_TOKENS}, 4096)
    cost = usd_to_pico(Decimal(tokens.prompt_tokens + 2 * MAX_TOKENS) / 1_000_000)
    return tokens.prompt_tokens, cost


class CommittedSpendSampler:
    """Reads the global counter's spent + reserved every few milliseconds; keeps the peak."""

    def __init__(self, url: str) -> None:
        self._engine = create_engine(url, pool_size=1, max_overflow=0)
        self._stop = threading.Event()
        self.peak = 0
        self.samples = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        committed = BudgetCounter.spent_pico_usd + BudgetCounter.reserved_pico_usd
        query = select(func.coalesce(func.sum(committed), 0)).where(
            BudgetCounter.scope == "global_daily"
        )
        with self._engine.connect() as conn:
            while not self._stop.is_set():
                self.peak = max(self.peak, int(conn.execute(query).scalar_one()))
                conn.rollback()
                self.samples += 1
                self._stop.wait(0.002)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._engine.dispose()


def test_concurrent_calls_from_several_processes_never_spend_past_the_cap(
    pg_url: str, sim: SimulatorProcess, tmp_path: Path, figures: dict[str, Any]
) -> None:
    prompt_tokens, worst_pico = _worst_case()
    cap_pico = CAP_CALLS * worst_pico

    def usage(completion: int) -> dict[str, Any]:
        return {
            "content": "x",
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion},
        }

    # 200 ms per answer: every admitted call holds its reservation while the others race
    sim.scripts(
        [
            {"match_user": "[full]", "reply": {**usage(MAX_TOKENS), "latency_ms": 200}},
            {"match_user": "[e500]", "reply": {"fault": "500", "latency_ms": 200}},
        ]
    )
    env = service_env(
        tmp_path,
        pg_url,
        sim,
        openai_max_retries=0,
        price_overrides=PRICES,
        budget_global_daily_usd=str(Decimal(cap_pico) / 10**12),
    )
    calls = [
        [
            {"key": f"r{p}{i:04d}-0", "kind": KINDS[i % 3], "user": f"u{p}{i:04d}"}
            for i in range(CALLS_PER_PROCESS)
        ]
        for p in range(PROCESSES)
    ]
    # the schema, before the workers race (they do not migrate)
    from app.core.migrations import upgrade_to_head

    upgrade_to_head(pg_url)

    ctx = forkserver()
    barrier = ctx.Barrier(PROCESSES)
    pipes, workers = [], []
    for p in range(PROCESSES):
        parent, child = ctx.Pipe()
        worker = ctx.Process(
            target=rel_race.race_worker,
            args=(env, calls[p], MODEL, MAX_TOKENS, DB_THREADS, barrier, child),
            daemon=True,
        )
        worker.start()
        child.close()
        pipes.append(parent)
        workers.append(worker)
    started = time.monotonic()
    sampler = CommittedSpendSampler(pg_url)
    outcomes: list[str] = []
    try:
        for parent in pipes:
            assert parent.poll(300), "a race worker did not answer"
            outcomes.extend(parent.recv())
    finally:
        sampler.stop()
    seconds = time.monotonic() - started
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0

    ledger = Ledger(pg_url)
    try:
        rows = ledger.rows()
        spent, reserved = ledger.counter("global_daily")
        open_reservations = ledger.open_reservations()
        reserved_total = ledger.reserved_pico()
    finally:
        ledger.close()
    stats = sim.stats()
    seen = Counter(outcomes)
    statuses = Counter(r.status for r in rows)
    by_key = Counter(r.task_id for r in rows)
    figures.update(
        processes=PROCESSES,
        calls=len(outcomes),
        outcomes=dict(seen),
        cap_usd=str(Decimal(cap_pico) / 10**12),
        spent_usd=str(Decimal(spent) / 10**12),
        spent_share_of_cap=round(spent / cap_pico, 4),
        peak_committed_share_of_cap=round(sampler.peak / cap_pico, 4),
        samples=sampler.samples,
        seconds=round(seconds, 2),
        sim_requests=stats["requests"],
    )

    assert len(outcomes) == PROCESSES * CALLS_PER_PROCESS
    assert seen["blocked"] > 0 and seen["ok"] > 0, "the cap was never reached, or never admitted"
    assert spent <= cap_pico
    assert sampler.peak <= cap_pico, "spent + reserved passed the cap during the race"
    assert seen["ok"] <= CAP_CALLS  # each is billed its worst case: the cap pays for CAP_CALLS
    assert (reserved, reserved_total, open_reservations) == (0, 0, 0)
    assert spent == sum(r.cost_pico_usd for r in rows)
    assert len(rows) == len(outcomes) and set(by_key.values()) == {1}
    assert statuses["success"] == seen["ok"] == stats["succeeded"]
    assert statuses["blocked"] == seen["blocked"]
    assert statuses["error"] == seen["InternalServerError"]
    assert stats["requests"] == seen["ok"] + seen["InternalServerError"]
