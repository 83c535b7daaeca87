"""The tracking thread of async callers: batched rows, never a lost or double-counted one."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select

from app.core.db import SqliteCheckpointer, create_db_engine
from app.core.migrations import upgrade_to_head
from app.core.prepared import Tx
from app.models import LLMUsage, UsageRollupDaily
from app.simulator.server import SimulatorServer
from app.tracking.db_worker import DbWorker, batched
from app.tracking.llm_client import AsyncLLMClient
from app.tracking.record import UsageRecord
from app.tracking.spool import UsageSpool
from app.tracking.writer import UsageWriter, WriteOutcome

UNREACHABLE = "postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=1"


def counts(engine: Engine) -> tuple[int, int, int]:
    with engine.connect() as conn:
        rows = conn.scalar(select(func.count()).select_from(LLMUsage))
        rolled = conn.scalar(select(func.coalesce(func.sum(UsageRollupDaily.requests), 0)))
        cost = conn.scalar(select(func.coalesce(func.sum(LLMUsage.cost_pico_usd), 0)))
    return int(rows or 0), int(rolled or 0), int(cost or 0)


def record(i: int, **fields: Any) -> UsageRecord:
    return UsageRecord(
        request_id=f"req-{i}", model="gpt-4o", status="success", cost_pico_usd=i, **fields
    )


async def write_all(worker: DbWorker, jobs: list[tuple[UsageRecord, Any]]) -> list[WriteOutcome]:
    futures = [worker.write(rec, also) for rec, also in jobs]  # queued before any completes
    return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))


def test_concurrent_writes_share_transactions_and_count_once(
    engine: Engine, tmp_path: Path
) -> None:
    worker = DbWorker(UsageWriter(engine, UsageSpool(tmp_path)))
    jobs = [(record(i), None) for i in range(300)] + [(record(7), None), (record(8), None)]

    outcomes = asyncio.run(write_all(worker, jobs))
    worker.close()

    assert all(o.persisted for o in outcomes)
    assert counts(engine) == (300, 300, sum(range(300)))


def test_work_joined_to_a_row_commits_with_it_and_a_failing_one_costs_no_row(
    engine: Engine, tmp_path: Path
) -> None:
    worker = DbWorker(UsageWriter(engine, UsageSpool(tmp_path)))
    joined: list[str] = []

    def ok(rec: UsageRecord) -> Any:
        def also(tx: Tx) -> None:
            assert isinstance(tx, Tx)
            joined.append(rec.request_id)

        return also

    def broken(tx: Tx) -> None:
        raise RuntimeError("the settlement failed")

    jobs = [(record(i), ok(record(i))) for i in range(20)] + [(record(99), broken)]
    outcomes = asyncio.run(write_all(worker, jobs))
    worker.close()

    # The batch failed as a whole; every row was then written on its own, with its own work.
    assert [o.persisted for o in outcomes] == [True] * 21
    assert [o.also_committed for o in outcomes] == [True] * 20 + [False]
    assert counts(engine) == (21, 21, sum(range(20)) + 99)
    assert set(joined) >= {f"req-{i}" for i in range(20)}


def test_rows_of_a_database_that_is_down_are_spooled_not_lost(tmp_path: Path) -> None:
    down = create_db_engine(UNREACHABLE)
    spool = UsageSpool(tmp_path / "spool")
    worker = DbWorker(UsageWriter(down, spool))

    outcomes = asyncio.run(write_all(worker, [(record(i), None) for i in range(5)]))
    worker.close()
    down.dispose()

    assert [o.persisted for o in outcomes] == [False] * 5
    assert spool.pending() == 5


def test_calls_return_their_result_or_raise_their_error(engine: Engine, tmp_path: Path) -> None:
    worker = DbWorker(UsageWriter(engine, UsageSpool(tmp_path)))

    def fails() -> None:
        raise ValueError("refused")

    assert worker.call(lambda: 41 + 1).result(timeout=10) == 42
    with pytest.raises(ValueError, match="refused"):
        worker.call(fails).result(timeout=10)
    worker.close()


def test_close_finishes_queued_rows_and_later_ones_are_written_in_the_caller(
    engine: Engine, tmp_path: Path
) -> None:
    worker = DbWorker(UsageWriter(engine, UsageSpool(tmp_path)))
    queued = [worker.write(record(i), None) for i in range(50)]
    worker.close()
    late = worker.write(record(50), None)

    assert all(f.done() for f in [*queued, late])
    assert counts(engine)[:2] == (51, 51)


def test_async_client_calls_land_through_the_worker(
    runtime_factory: Any, sim: SimulatorServer, engine: Engine
) -> None:
    runtime = runtime_factory()
    client = AsyncLLMClient(task_id="t-async", user_id="u", runtime=runtime)

    async def burst() -> None:
        await asyncio.gather(
            *(
                client.chat_completion(messages=[{"role": "user", "content": "hi"}], model="gpt-4o")
                for _ in range(40)
            )
        )

    asyncio.run(burst())

    assert counts(engine)[:2] == (40, 40)
    assert sim.state.stats()["requests"] == 40


def test_the_checkpointer_moves_the_wal_into_the_database_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ckpt.db'}"
    upgrade_to_head(url)
    engine = create_db_engine(url)

    @event.listens_for(engine, "connect")
    def no_autocheckpoint(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.execute("PRAGMA wal_autocheckpoint=0")  # only the thread may checkpoint

    writer = UsageWriter(engine, UsageSpool(tmp_path / "spool"))
    for i in range(300):
        writer.write(record(i, error_message="x" * 500))
    db_file = tmp_path / "ckpt.db"
    before = os.path.getsize(db_file)
    checkpointer = SqliteCheckpointer(engine, interval=0.05)
    checkpointer.start()
    deadline = time.monotonic() + 10
    while os.path.getsize(db_file) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    checkpointer.stop()
    after = os.path.getsize(db_file)
    engine.dispose()

    assert after > before + 100_000  # 300 rows of ~600 bytes, their indexes and rollups


def test_calls_that_join_a_batch_run_their_items_together_once(
    engine: Engine, tmp_path: Path
) -> None:
    worker = DbWorker(UsageWriter(engine, UsageSpool(tmp_path)))
    batches: list[list[int]] = []
    gate = threading.Event()

    def runner(items: Sequence[Any]) -> list[Any]:
        batches.append(list(items))
        return [item * 10 if item != 3 else None for item in items]

    def joined(item: int) -> Any:
        try:
            result = batched(runner, item)
        except Exception:  # the caller's own handler never sees the join
            return "caught"
        return result if result is not None else f"alone {item}"

    blocker = worker.call(gate.wait)  # holds the thread while the others queue behind it
    futures = [worker.call(lambda i=i: joined(i)) for i in range(5)]
    plain = worker.call(lambda: "plain")
    gate.set()
    blocker.result(timeout=10)
    results = [f.result(timeout=10) for f in futures]
    worker.close()

    assert batches == [[0, 1, 2, 3, 4]]
    assert results == [0, 10, 20, "alone 3", 40]
    assert plain.result() == "plain"
    assert batched(runner, 7) is None  # outside the worker: no batch, do it alone
