"""The budget reservation's own cost: reserve + settle round trips under 100-way concurrency.

No LLM call is made: each worker thread calls ``DatabaseBudgetGuard.reserve`` and then ``settle``
with a record costing exactly the reservation, as ``LLMClient`` does around a call (the spend
itself is booked by the ledger's trigger when a usage row is written; no row is written here, so
this is the reservation alone). Every call reserves on four counters (its task, its user's day
and month, the global day) with limits set on all four scopes, so each reservation takes the
conditional-UPDATE path. Two shapes:

- ``spread``: every worker has its own task and user; only the global row is shared (the common
  case, and the hottest row there is);
- ``one-user``: all workers are one user's agents, so the user and global rows are both hot;
- ``async``: 100 coroutines on one event loop, each its own task and user, reserving and settling
  as ``AsyncLLMClient`` does: the reservation on the tracking thread (``DbWorker.call``; several
  queued together are taken in one transaction since issue 17), the settlement with the call's
  usage row (``DbWorker.write``, so this shape writes the rows too).

The engine is the service's own (``create_db_engine``: SQLite in WAL mode; PostgreSQL pool of 10
plus 20 overflow), so 100 threads also queue for connections, as they would in the service.

    cd backend && .venv/bin/python ../bench/budget_reservation.py \\
        [--threads 100] [--rounds 20] [--backends sqlite,postgresql] [--postgres-url URL]
        [--shapes sequential,spread,one-user,async] [--db-prefix asa_bench]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from app.budgets.guard import DatabaseBudgetGuard, Reservation
from app.core.config import Settings
from app.core.db import create_db_engine
from app.core.migrations import upgrade_to_head
from app.tracking.db_worker import DbWorker
from app.tracking.pricing import PriceBook
from app.tracking.record import UsageRecord
from app.tracking.spool import UsageSpool
from app.tracking.tracker import CallContext
from app.tracking.writer import UsageWriter

MODEL = "bench-model"
PRICES = {MODEL: {"input_mtok": Decimal("1"), "output_mtok": Decimal("2")}}
REQUEST = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 256}
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextmanager
def sqlite_database() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        upgrade_to_head(url)
        yield url


@contextmanager
def postgres_database(server_url: str, prefix: str = "asa_bench") -> Iterator[str]:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade_to_head(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def run_shape(
    guard: DatabaseBudgetGuard, context_of: Callable[[int], CallContext], threads: int, rounds: int
) -> dict[str, Any]:
    reserve_ms: list[float] = []
    settle_ms: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(threads + 1)

    def worker(index: int) -> None:
        context = context_of(index)
        mine_reserve, mine_settle = [], []
        start.wait()
        for _ in range(rounds):
            t0 = time.perf_counter()
            reservation = guard.reserve(context=context, model=MODEL, request=REQUEST)
            t1 = time.perf_counter()
            assert isinstance(reservation, Reservation)
            record = UsageRecord(
                request_id=uuid.uuid4().hex,
                model=MODEL,
                status="success",
                task_id=context.task_id,
                user_id=context.user_id,
                cost_pico_usd=reservation.amount_pico,
            )
            guard.settle(reservation, record)
            t2 = time.perf_counter()
            mine_reserve.append((t1 - t0) * 1000)
            mine_settle.append((t2 - t1) * 1000)
        with lock:
            reserve_ms.extend(mine_reserve)
            settle_ms.extend(mine_settle)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in pool:
        thread.join()
    wall = time.perf_counter() - began
    summary, round_trip = summarize(reserve_ms, settle_ms, wall, settle_name="settle")
    summary["round_trip_p99_ms"] = round(pct(round_trip, 0.99), 2)
    summary["round_trip_mean_ms"] = round(statistics.fmean(round_trip), 2)
    return summary


def summarize(
    reserve_ms: list[float], settle_ms: list[float], wall: float, *, settle_name: str
) -> tuple[dict[str, Any], list[float]]:
    """Round trips per second and the percentiles of each half and of the whole (and the
    round trips themselves, for a shape's extra figures)."""
    round_trip = [r + s for r, s in zip(reserve_ms, settle_ms, strict=True)]
    return {
        "round_trips": len(round_trip),
        "round_trips_per_s": round(len(round_trip) / wall, 1),
        "reserve_p50_ms": round(pct(reserve_ms, 0.50), 2),
        "reserve_p95_ms": round(pct(reserve_ms, 0.95), 2),
        f"{settle_name}_p50_ms": round(pct(settle_ms, 0.50), 2),
        f"{settle_name}_p95_ms": round(pct(settle_ms, 0.95), 2),
        "round_trip_p50_ms": round(pct(round_trip, 0.50), 2),
        "round_trip_p95_ms": round(pct(round_trip, 0.95), 2),
    }, round_trip


def run_async_shape(
    guard: DatabaseBudgetGuard, worker: DbWorker, concurrency: int, rounds: int
) -> dict[str, Any]:
    """``concurrency`` coroutines, ``rounds`` calls each: reserve on the tracking thread, then
    the usage row with the settlement in its transaction, as ``AsyncLLMClient`` does."""
    reserve_ms: list[float] = []
    settle_ms: list[float] = []

    def settling(reservation: Reservation, record: UsageRecord) -> Callable[[Any], None]:
        return lambda tx: guard.settle(reservation, record, tx)

    async def one(index: int) -> None:
        context = CallContext(task_id=f"a-{index}", user_id=f"au-{index}")
        for _ in range(rounds):
            t0 = time.perf_counter()
            reservation = await asyncio.wrap_future(
                worker.call(lambda: guard.reserve(context=context, model=MODEL, request=REQUEST))
            )
            t1 = time.perf_counter()
            assert isinstance(reservation, Reservation)
            record = UsageRecord(
                request_id=uuid.uuid4().hex,
                model=MODEL,
                status="success",
                task_id=context.task_id,
                user_id=context.user_id,
                cost_pico_usd=reservation.amount_pico,
            )
            await asyncio.wrap_future(worker.write(record, settling(reservation, record)))
            reserve_ms.append((t1 - t0) * 1000)
            settle_ms.append((time.perf_counter() - t1) * 1000)

    async def run() -> float:
        began = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(concurrency)))
        return time.perf_counter() - began

    wall = asyncio.run(run())
    summary, _ = summarize(reserve_ms, settle_ms, wall, settle_name="settle_and_row")
    summary["reserve_mean_ms"] = round(statistics.fmean(reserve_ms), 2)
    return summary


def bench_backend(
    url: str, threads: int, rounds: int, shapes: tuple[str, ...] = ("sequential", "spread")
) -> dict[str, Any]:
    settings = Settings(
        database_url=url,
        auto_migrate=False,
        budget_task_max_usd=Decimal(1000),
        budget_user_daily_usd=Decimal(1000),
        budget_user_monthly_usd=Decimal(1000),
        budget_global_daily_usd=Decimal(1000),
    )
    engine = create_db_engine(url)
    guard = DatabaseBudgetGuard(engine, settings, PriceBook(PRICES))
    results: dict[str, Any] = {}
    spool = tempfile.TemporaryDirectory()
    worker = DbWorker(UsageWriter(engine, UsageSpool(Path(spool.name))))
    try:
        # Warm the pool and the counter rows' pages; not measured.
        run_shape(guard, lambda i: CallContext(task_id=f"warm-{i}", user_id="warm"), 4, 5)
        if "sequential" in shapes:
            results["sequential"] = run_shape(
                guard,
                lambda i: CallContext(task_id="seq", user_id="seq"),
                1,
                threads * rounds // 10,
            )
        if "spread" in shapes:
            results["spread"] = run_shape(
                guard, lambda i: CallContext(task_id=f"t-{i}", user_id=f"u-{i}"), threads, rounds
            )
        if "one-user" in shapes:
            results["one-user"] = run_shape(
                guard, lambda i: CallContext(task_id=f"o-{i}", user_id="one"), threads, rounds
            )
        if "async" in shapes:
            run_async_shape(guard, worker, threads, 1)  # the counters of the day; not measured
            results["async"] = run_async_shape(guard, worker, threads, rounds)
    finally:
        worker.close()
        engine.dispose()
        spool.cleanup()
    return results


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20, help="round trips per thread")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument(
        "--postgres-url", default=os.environ.get("ASA_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    )
    parser.add_argument("--shapes", default="sequential,spread,one-user,async")
    parser.add_argument("--db-prefix", default="asa_bench", help="scratch PostgreSQL database")
    args = parser.parse_args()
    shapes = tuple(args.shapes.split(","))
    report: dict[str, Any] = {"machine": machine(), "threads": args.threads}
    for backend in args.backends.split(","):
        database = (
            sqlite_database()
            if backend == "sqlite"
            else postgres_database(args.postgres_url, args.db_prefix)
        )
        with database as url:
            report[backend] = bench_backend(url, args.threads, args.rounds, shapes)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
