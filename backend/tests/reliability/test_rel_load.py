"""Scenario 7: load on the usage endpoints and task submission, from a client on loopback.

The load generator is ``bench/load_api.py`` (``run_load``): async clients keep the service busy
with the task, user and overall usage reports, the task metrics and task submissions (the
service's worker runs the submitted tasks meanwhile). The ledger is first seeded by the call
stream, so that the reports read real rows.

Counted: no request fails (every answer 2xx, no transport error); every submission that was
accepted is exactly one task in the database, and there is no other. Figures: throughput,
p50/p99 latency overall and per operation, errors, and the service's RSS before and after.

CI: 5 s at 16 clients, on SQLite and PostgreSQL. Full (``ASA_RELIABILITY_FULL=1``): 60 s at 32.
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

from sqlalchemy import select

from app.models import Task
from tests.support.reliability import (
    BACKEND_DIR,
    Ledger,
    SimulatorProcess,
    read_call_log,
    size,
    wait_until,
)

SECONDS = size(5.0, 60.0)
CONCURRENCY = size(16, 32)
SEED_CALLS = 25  # per lane, 4 lanes


def _load_generator() -> ModuleType:
    path = BACKEND_DIR.parent / "bench" / "load_api.py"
    spec = importlib.util.spec_from_file_location("asa_bench_load_api", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_usage_reports_and_submissions_under_load_answer_and_count_every_task(
    start_service: Any,
    ledger_url: str,
    ledger: Ledger,
    sim: SimulatorProcess,
    tmp_path: Path,
    figures: dict[str, Any],
) -> None:
    load = _load_generator()
    # The per-key rate limit and the per-user queue cap are off: this scenario measures the
    # service under load, not its refusals (tests/tasks/test_fair_queue.py has those).
    service = start_service(
        ledger_url, task_submit_rate_per_minute=0, task_max_queued_per_user=100_000
    )
    service.stream("seed", {"sync": 4}, max_calls=SEED_CALLS)
    assert wait_until(lambda: service.returned() >= 4 * SEED_CALLS, timeout=60)
    service.drain()
    task_ids = sorted({e["key"] for e in read_call_log(service.call_log)})

    result = asyncio.run(
        load.run_load(
            service.url,
            seconds=SECONDS,
            concurrency=CONCURRENCY,
            repo_url=str(tmp_path / "examples" / "buggy-calculator"),
            task_ids=task_ids,
            user_id="rel-user",
            pid=service.pid,
        )
    )
    service.stop()

    with ledger.engine.connect() as conn:
        stored = list(conn.scalars(select(Task.id)))
    accepted = result.pop("accepted_task_ids")
    figures.update(result, database=ledger.engine.dialect.name)

    assert result["requests"] > 0
    assert result["errors"] == 0, result["error_kinds"]
    assert result["tasks_accepted"] > 0
    assert sorted(stored) == sorted(accepted)
    assert len(set(accepted)) == len(accepted)
