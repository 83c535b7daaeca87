"""The database circuit breaker: one timeout per outage, not per call; a probe that notices the
database back; its state on ``/metrics`` and ``/health``."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError, OperationalError

from app.core.prepared import Statement
from app.core.runtime import Runtime
from app.main import create_app
from app.models import LLMUsage
from app.simulator.server import SimulatorServer
from app.tracking.breaker import DatabaseUnavailable, database_breaker, is_outage
from app.tracking.llm_client import AsyncLLMClient, LLMClient
from tests.conftest import make_settings
from tests.support.reliability import SqliteOutage, wait_until

BUSY_TIMEOUT = 2.0
INSERT_ROW = Statement(
    insert(LLMUsage.__table__).values(model="m", status="success"),  # type: ignore[arg-type]
    column_keys=["request_id"],
)
MESSAGES = [{"role": "user", "content": "during an outage"}]


def rows(runtime: Runtime) -> int:
    with runtime.engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(LLMUsage)) or 0)


def breaker_open_metric() -> float:
    return REGISTRY.get_sample_value("asa_database_breaker_open") or 0.0


@pytest.fixture
def locked_sqlite(sqlite_url: str, sim: SimulatorServer, tmp_path: Path) -> Any:
    """A runtime on SQLite (busy timeout 1 s, spool replayer running) and a way to lock its file
    from another connection, as another process holding ``BEGIN EXCLUSIVE`` would."""
    settings = make_settings(
        sqlite_url,
        sim.base_url,
        tmp_path,
        sqlite_busy_timeout_seconds=BUSY_TIMEOUT,
        spool_replay_interval_seconds=30.0,  # only the breaker's recovery can replay in time
    )
    runtime = Runtime.build(settings)
    outage = SqliteOutage(sqlite_url)
    try:
        yield runtime, outage
    finally:
        outage.end()
        runtime.close()


def test_a_locked_sqlite_file_costs_a_run_of_calls_one_busy_timeout(locked_sqlite: Any) -> None:
    runtime, outage = locked_sqlite
    client = LLMClient(task_id="locked", user_id="u", runtime=runtime)
    before = rows(runtime)
    outage.begin()
    took = []
    for _ in range(5):
        started = time.perf_counter()
        client.chat_completion(messages=MESSAGES, model="gpt-4o-mini")
        took.append(time.perf_counter() - started)
    spooled = runtime.writer.spool.pending()

    # Without the breaker each call waited out the busy timeout (5 timeouts in all); with it
    # the first call pays one and the others go straight to the spool.
    assert sum(took) < 3 * BUSY_TIMEOUT, took  # one timeout and five quick calls, not five
    assert took[0] >= BUSY_TIMEOUT
    assert spooled == 5
    assert database_breaker(runtime.engine).state == "open"
    assert breaker_open_metric() == 1.0

    outage.end()
    # The probe sees the lock gone, closes the breaker and wakes the replayer (its own interval
    # is 30 s here): the rows land within moments.
    assert wait_until(lambda: rows(runtime) == before + 5, timeout=10)
    assert database_breaker(runtime.engine).state == "closed"
    assert breaker_open_metric() == 0.0
    assert runtime.writer.spool.pending() == 0


async def test_async_calls_during_a_lock_share_one_timeout(locked_sqlite: Any) -> None:
    runtime, outage = locked_sqlite
    client = AsyncLLMClient(task_id="locked-async", user_id="u", runtime=runtime)
    before = rows(runtime)
    outage.begin()
    started = time.perf_counter()
    for _ in range(3):  # three rounds of 20 concurrent calls
        await asyncio.gather(
            *(client.chat_completion(messages=MESSAGES, model="gpt-4o-mini") for _ in range(20))
        )
    took = time.perf_counter() - started
    assert took < 3 * BUSY_TIMEOUT  # one timeout, not one per call (60 of them)
    assert runtime.writer.spool.pending() == 60
    outage.end()
    assert wait_until(lambda: rows(runtime) == before + 60, timeout=10)


def test_probe_now_closes_the_breaker_as_soon_as_the_database_answers(
    locked_sqlite: Any,
) -> None:
    # The spool's final replay at shutdown asks for this: it cannot wait for the next probe.
    runtime, outage = locked_sqlite
    breaker = database_breaker(runtime.engine)
    outage.begin()
    LLMClient(task_id="probe", user_id="u", runtime=runtime).chat_completion(
        messages=MESSAGES, model="gpt-4o-mini"
    )
    assert breaker.is_open
    assert not breaker.probe_now()  # still locked: stays open

    outage.end()

    assert breaker.probe_now()
    assert not breaker.is_open
    assert breaker_open_metric() == 0.0


async def test_health_shows_the_breaker_and_stays_degraded_until_it_closes(
    sqlite_url: str, sim: SimulatorServer, tmp_path: Path
) -> None:
    settings = make_settings(
        sqlite_url,
        sim.base_url,
        tmp_path,
        sqlite_busy_timeout_seconds=BUSY_TIMEOUT,
        run_task_worker=False,
        examples_dir=tmp_path / "examples",
        workspace_root=tmp_path / "ws",
    )
    app = create_app(settings)
    outage = SqliteOutage(sqlite_url)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://asa.test") as http,
    ):
        runtime: Runtime = app.state.runtime
        try:
            healthy = (await http.get("/health")).json()
            assert healthy["database_breaker"] == "closed" and healthy["status"] == "ok"
            assert healthy["database"] == "ok" and "spool_pending" in healthy  # fields kept
            assert healthy["tracking_writer"] in ("process", "starting")  # started at startup

            outage.begin()
            client = LLMClient(runtime=runtime)
            await asyncio.to_thread(client.chat_completion, messages=MESSAGES, model="gpt-4o-mini")
            down = (await http.get("/health")).json()
            assert down["database_breaker"] == "open" and down["status"] == "degraded"
            assert down["spool_pending"] == 1
            metrics = (await http.get("/metrics")).text
            assert "asa_database_breaker_open 1.0" in metrics

            outage.end()
            assert wait_until(lambda: database_breaker(runtime.engine).state == "closed", 10)
            back = (await http.get("/health")).json()
            assert back["database_breaker"] == "closed" and back["status"] == "ok"
        finally:
            outage.end()


def test_an_open_breaker_refuses_a_transaction_before_it_reaches_the_database(
    locked_sqlite: Any,
) -> None:
    runtime, outage = locked_sqlite
    breaker = database_breaker(runtime.engine)
    outage.begin()
    with pytest.raises(OperationalError), breaker.transaction(runtime.writer.gate) as tx:
        tx.execute(INSERT_ROW, {"request_id": "one-timeout"})  # waits out the busy timeout
    assert breaker.is_open
    # Now refused at once with the breaker's own error: the database was not asked.
    with pytest.raises(DatabaseUnavailable), breaker.transaction(runtime.writer.gate) as tx:
        tx.execute(INSERT_ROW, {"request_id": "refused"})


def test_races_and_constraint_errors_are_not_outages() -> None:
    assert not is_outage(OperationalError("UPDATE", {}, psycopg.errors.DeadlockDetected()))
    assert not is_outage(OperationalError("UPDATE", {}, psycopg.errors.SerializationFailure()))
    assert is_outage(OperationalError("SELECT 1", {}, psycopg.OperationalError("refused")))
    duplicate = sqlite3.IntegrityError("UNIQUE constraint failed: t.id")
    assert not is_outage(IntegrityError("INSERT", {}, duplicate))
    locked = sqlite3.OperationalError("database is locked")
    assert is_outage(OperationalError("INSERT", {}, locked))
    assert not is_outage(DatabaseUnavailable("already open"))
    assert not is_outage(ValueError("not a database error"))
