"""The ledger never loses nor double-counts: idempotent writes, and the spool for outages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select

from app.core.db import create_db_engine
from app.models import LLMUsage, UsageRollupDaily
from app.simulator.server import SimulatorServer
from app.tracking.llm_client import LLMClient
from app.tracking.record import UsageRecord
from app.tracking.spool import UsageSpool
from app.tracking.writer import UsageWriter, latency_bucket

UNREACHABLE = "postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=1"


def counts(engine: Engine) -> tuple[int, int]:
    with engine.connect() as conn:
        rows = conn.scalar(select(func.count()).select_from(LLMUsage))
        rolled = conn.scalar(select(func.coalesce(func.sum(UsageRollupDaily.requests), 0)))
    return int(rows or 0), int(rolled or 0)


def test_writing_the_same_call_twice_counts_it_once(engine: Engine, tmp_path: Path) -> None:
    writer = UsageWriter(engine, UsageSpool(tmp_path))
    record = UsageRecord(
        request_id="req-1", model="gpt-4o", status="success", prompt_tokens=5, cost_pico_usd=7
    )

    assert writer.write(record) and writer.write(record)

    assert counts(engine) == (1, 1)


def test_rows_spooled_while_the_database_is_down_are_replayed_once(
    engine: Engine, tmp_path: Path
) -> None:
    down = create_db_engine(UNREACHABLE)
    spool = UsageSpool(tmp_path / "spool")
    records = [
        UsageRecord(request_id=f"r{i}", model="gpt-4o-mini", status="success", prompt_tokens=i)
        for i in range(5)
    ]

    assert not any(UsageWriter(down, spool).write(r) for r in records)
    assert spool.pending() == 5

    writer = UsageWriter(engine, UsageSpool(tmp_path / "spool"))
    assert writer.replay_spool() == 5
    assert writer.replay_spool() == 0
    writer.insert_batch(records)  # a replay that raced a direct write changes nothing
    assert counts(engine) == (5, 5)
    assert spool.pending() == 0


def test_a_call_made_while_the_database_is_down_still_returns_and_is_spooled(
    runtime_factory: Any, sim: SimulatorServer, engine: Engine, tmp_path: Path
) -> None:
    runtime = runtime_factory(database_url=UNREACHABLE, spool_dir=tmp_path / "outage")

    response = LLMClient(task_id="t-outage", runtime=runtime).chat_completion(
        messages=[{"role": "user", "content": "hi"}], model="gpt-4o-mini"
    )

    assert response.choices
    replayed = UsageWriter(engine, UsageSpool(tmp_path / "outage")).replay_spool()
    assert replayed == 1
    with engine.connect() as conn:
        assert conn.scalar(select(LLMUsage.task_id)) == "t-outage"


def test_a_torn_spool_line_is_skipped_not_fatal(engine: Engine, tmp_path: Path) -> None:
    spool = UsageSpool(tmp_path)
    spool.append(UsageRecord(request_id="ok-1", model="m", status="success"))
    with spool.files()[0].open("a") as fh:
        fh.write('{"request_id": "torn", "mod')

    assert UsageWriter(engine, spool).replay_spool() == 1
    assert counts(engine)[0] == 1


def test_latency_buckets_are_upper_bound_inclusive() -> None:
    assert latency_bucket(0) == 0 and latency_bucket(5) == 0 and latency_bucket(5.01) == 1
    assert latency_bucket(10**9) == 14


class _FailingSettle:
    """A budget guard whose settle breaks inside the usage transaction, then works alone."""

    def __init__(self) -> None:
        self.alone: list[str] = []

    def reserve(self, **_: Any) -> str:
        return "reservation"

    def settle(self, reservation: str, record: UsageRecord, conn: Any = None) -> None:
        if conn is not None:
            raise RuntimeError("settle failed inside the row's transaction")
        self.alone.append(record.request_id)


def test_a_failing_settle_never_costs_the_usage_row(
    runtime_factory: Any, sim: SimulatorServer, engine: Engine
) -> None:
    guard = _FailingSettle()
    runtime = runtime_factory()

    LLMClient(runtime=runtime, budget=guard).chat_completion(
        messages=[{"role": "user", "content": "hi"}], model="gpt-4o-mini"
    )

    assert counts(engine) == (1, 1)
    assert len(guard.alone) == 1  # settled on its own after the joined attempt failed
