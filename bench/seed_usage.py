"""Bulk-load a synthetic usage ledger for the usage benchmarks (``bench/usage_endpoints.py``,
``bench/web_pages.py``), and what those two share: the ``tasks`` rows the console lists, the
ledger's figures, the benchmark settings and the timing summaries.

    cd backend
    .venv/bin/python ../bench/seed_usage.py --db sqlite:///data/bench-usage.db --rows 1000000
    .venv/bin/python ../bench/seed_usage.py \
        --db postgresql+psycopg://postgres@127.0.0.1:5432/asa_bench --rows 10000000

The database is dropped and rebuilt with the real migrations, up to the revision before the
daily task rollup. Rows are written with COPY on PostgreSQL (the secondary indexes dropped
before it and rebuilt after) and ``executemany`` on SQLite, and ``task_metrics`` gets the rows
the orchestrator writes for each finished task. Then ``alembic upgrade head`` builds every
rollup from those rows as it would on a live database: revision 0004 ``task_metrics_daily``,
revision 0008 the three usage rollups (per task, per user, overall) with the sums the usage
writer keeps row by row (``tests/usage/test_migration_0008_rollups.py`` checks the two agree;
``usage_endpoints.py`` checks every report against the raw rows). On PostgreSQL the upgrade
runs with ``work_mem`` 1 GB (``PGOPTIONS``), so its ``GROUP BY``s stay in memory.

The shape (deterministic for a given ``--seed``): calls spread over the last ``--days`` UTC days
ending today; ``--users`` users; tasks of 10-70 calls (40 on average) made on one day by one
user, each with one or two of five models; three agents (2% of calls have none); 94% success,
4% error, 2% blocked; 1% on an unpriced model; log-normal latency around 1.2 s; every call a
chat completion of provider openai (the shape of the earlier runs, so figures compare).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from alembic import command
from sqlalchemy import Connection, Engine, create_engine, func, select, text
from sqlalchemy.engine import make_url

BACKEND = Path(__file__).resolve().parents[1] / "backend"
sys.path.insert(0, str(BACKEND))

from app.core.config import Settings  # noqa: E402
from app.core.db import create_db_engine  # noqa: E402
from app.core.migrations import alembic_config, upgrade_to_head  # noqa: E402
from app.models import LLMUsage, Task, UsageRollupDaily, UsageRollupUserDaily  # noqa: E402
from app.usage.outcomes import backfill_task_outcomes  # noqa: E402

# (model, input pico-USD per token, output pico-USD per token); the last one has no price.
MODELS = [
    ("gpt-4o", 2_500_000, 10_000_000),
    ("gpt-4o-mini", 150_000, 600_000),
    ("gpt-4.1", 2_000_000, 8_000_000),
    ("o3-mini", 1_100_000, 4_400_000),
    ("local-llama", 0, 0),
]
AGENTS = ["fix_agent", "code_agent", "test_generator"]
# task_metrics_daily (revision 0004) and the usage rollups (revision 0008) are filled by their
# revisions from the rows: the loader migrates to the revision before the first, loads, then
# migrates to head.
BEFORE_ROLLUPS = "0003"
COLUMNS = (
    "id", "request_id", "task_id", "user_id", "agent", "provider", "model", "prompt_tokens",
    "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens", "cost_pico_usd",
    "cost_status", "latency_ms", "status", "is_stream", "is_partial", "attempts", "error_type",
    "timestamp",
)  # fmt: skip


@dataclass(frozen=True)
class Shape:
    rows: int
    days: int
    users: int
    seed: int
    today: date


def generate(shape: Shape, *, iso_tz: bool, null: str | None) -> Iterator[tuple[object, ...]]:
    """Rows in COLUMNS order; timestamps as text in the form each backend stores, and ``null``
    for a missing value (``None`` for a driver, ``\\N`` for COPY text).

    Written for speed (about 10 us a row): a task's calls all fall on its day, so timestamps
    are formatted from integers rather than through datetime.
    """
    rng = random.Random(shape.seed)
    rand, randrange = rng.random, rng.randrange
    # Draws from fixed pools of 2^16 log-normal values: an order of magnitude faster.
    pool = 1 << 16
    prompts = [int(rng.lognormvariate(7.5, 0.8)) for _ in range(pool)]
    completions = [int(rng.lognormvariate(5.5, 0.9)) for _ in range(pool)]
    latencies = [round(rng.lognormvariate(math.log(1200), 0.7), 3) for _ in range(pool)]
    first_day = shape.today - timedelta(days=shape.days - 1)
    day_texts = [(first_day + timedelta(days=d)).isoformat() for d in range(shape.days)]
    suffix = "+00" if iso_tz else ""
    seq = 0
    task_no = 0
    while seq < shape.rows:
        task_no += 1
        task_id = f"task-{task_no:08d}"
        user_id = f"user-{randrange(shape.users):05d}"
        day_text = day_texts[randrange(shape.days)]
        start = randrange(70_000)  # seconds into the day; 70 calls x 20 s still end that day
        models = rng.sample(MODELS[:4], rng.choice((1, 2)))
        calls = min(rng.randint(10, 70), shape.rows - seq)
        for i in range(calls):
            seq += 1
            model, in_price, out_price = MODELS[4] if rand() < 0.01 else models[i % len(models)]
            agent = AGENTS[i % 3] if rand() >= 0.02 else null
            r = rand()
            status = "success" if r < 0.94 else "error" if r < 0.98 else "blocked"
            if status == "blocked":
                prompt = completion = cached = reasoning = 0
                latency = round(r * 100 - 98, 3)  # r in [0.98, 1): 0-2 ms
            else:
                prompt = prompts[int(rand() * pool)]
                completion = completions[int(rand() * pool)] if status == "success" else 0
                cached = prompt // 2 if rand() < 0.3 else 0
                reasoning = completion // 3 if model == "o3-mini" else 0
                latency = latencies[int(rand() * pool)]
            cost = (prompt - cached) * in_price + cached * in_price // 2 + completion * out_price
            second = start + i * 20
            stamp = (
                f"{day_text} {second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d}"
                f".{int(rand() * 1_000_000):06d}{suffix}"
            )
            yield (
                f"{seq:032x}",
                f"req-{seq:012d}",
                task_id,
                user_id,
                agent,
                "openai",
                model,
                prompt,
                completion,
                prompt + completion,
                cached,
                reasoning,
                cost,
                "unpriced" if in_price == 0 else "priced",
                latency,
                status,
                False,
                False,
                1,
                "APIError" if status == "error" else null,
                stamp,
            )


def _task_metrics_sql(dialect: str) -> list[str]:
    """What the orchestrator writes per finished task, derived from the task's calls: one scan
    of ``llm_usage`` into a per-task table, then five rows per task from it."""
    if dialect == "postgresql":
        pick = "(hashtext(task_id) & 1023)"
        to_usd = "cost_pico_usd::numeric / 1000000000000"
        new_id = "md5(task_id || '{name}')"
    else:
        pick = "(abs(CAST(substr(task_id, 6) AS INTEGER) * 2654435761) % 1024)"
        to_usd = "cost_pico_usd / 1000000000000.0"
        new_id = "lower(hex(randomblob(16)))"
    per_task = (
        f"CREATE TEMPORARY TABLE bench_task AS SELECT task_id, {pick} AS pick, "
        "COUNT(*) AS calls, SUM(cost_pico_usd) AS cost_pico_usd, MAX(timestamp) AS finished "
        "FROM llm_usage GROUP BY task_id"
    )
    metrics = {
        "succeeded": "CASE WHEN pick < 700 THEN 1 ELSE 0 END",
        "duration_seconds": "(60 + pick * 3.7)",
        "cost_usd": to_usd,
        "llm_calls": "calls",
    }
    selects = [
        f"SELECT {new_id.format(name=name)}, task_id, '{name}', {value}, finished FROM bench_task"
        for name, value in metrics.items()
    ]
    status = (
        "CASE WHEN pick < 700 THEN 'status.succeeded' WHEN pick < 950 THEN 'status.failed' "
        "WHEN pick < 1000 THEN 'status.budget_exceeded' ELSE 'status.cancelled' END"
    )
    selects.append(
        f"SELECT {new_id.format(name='status')}, task_id, {status}, 1, finished FROM bench_task"
    )
    insert = "INSERT INTO task_metrics (id, task_id, metric_name, metric_value, timestamp) " + (
        " UNION ALL ".join(selects)
    )
    return [per_task, insert, "DROP TABLE bench_task"]


def recreate_database(url: str) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database or "")
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
        return
    admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{parsed.database}"'))
    admin.dispose()


def load_postgres(engine: Engine, shape: Shape, timings: dict[str, float]) -> None:
    # The secondary indexes are dropped for the COPY and rebuilt after it (a sort per index
    # instead of a b-tree insert per row), from the model's own definitions.
    table: Any = LLMUsage.__table__
    secondary = [i for i in table.indexes if str(i.name).startswith("ix_llm_usage_")]
    t0 = time.perf_counter()
    with engine.begin() as conn:
        for index in secondary:
            index.drop(conn)
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("SET synchronous_commit = off")
        copy_sql = f"COPY llm_usage ({', '.join(COLUMNS)}) FROM STDIN"
        line = "\t".join(["%s"] * len(COLUMNS)) + "\n"
        with cursor.copy(copy_sql) as copy:
            lines: list[str] = []
            for row in generate(shape, iso_tz=True, null=r"\N"):
                lines.append(line % row)
                if len(lines) == 50_000:
                    copy.write("".join(lines))
                    lines.clear()
            copy.write("".join(lines))
        raw.commit()
    finally:
        raw.close()
    timings["copy_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL maintenance_work_mem = '512MB'"))
        for index in secondary:
            index.create(conn)
    timings["create_indexes_s"] = time.perf_counter() - t0


def load_sqlite(engine: Engine, shape: Shape, timings: dict[str, float]) -> None:
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("PRAGMA synchronous=OFF")
        placeholders = ", ".join("?" * len(COLUMNS))
        sql = f"INSERT INTO llm_usage ({', '.join(COLUMNS)}) VALUES ({placeholders})"
        batch: list[tuple[object, ...]] = []
        for row in generate(shape, iso_tz=False, null=None):
            batch.append(row)
            if len(batch) == 50_000:
                cursor.executemany(sql, batch)
                batch.clear()
        cursor.executemany(sql, batch)
        raw.commit()
    finally:
        raw.close()


def seed(url: str, shape: Shape) -> dict[str, float]:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    recreate_database(url)
    command.upgrade(alembic_config(url), BEFORE_ROLLUPS)
    engine = create_db_engine(url)
    dialect = engine.dialect.name
    timings["migrate_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    (load_postgres if dialect == "postgresql" else load_sqlite)(engine, shape, timings)
    timings["load_rows_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with engine.begin() as conn:
        if dialect == "postgresql":
            conn.execute(text("SET LOCAL work_mem = '1GB'"))  # the GROUP BY in memory
        for statement in _task_metrics_sql(dialect):
            conn.execute(text(statement))
    timings["build_task_metrics_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    previous = os.environ.get("PGOPTIONS")
    os.environ["PGOPTIONS"] = "-c work_mem=1GB"  # libpq: the migration's GROUP BYs in memory
    try:
        upgrade_to_head(url)  # 0004 fills task_metrics_daily, 0008 the usage rollups
    finally:
        if previous is None:
            del os.environ["PGOPTIONS"]
        else:
            os.environ["PGOPTIONS"] = previous
    timings["migrate_to_head_and_build_rollups_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if dialect == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
    else:
        with engine.begin() as conn:
            conn.execute(text("ANALYZE"))
    timings["analyze_s"] = time.perf_counter() - t0
    with engine.connect() as conn:
        timings.update(table_rows(conn))
    engine.dispose()
    return timings


# -- what the benchmarks on a seeded ledger share ----------------------------------------------

COUNTED_TABLES = (
    "llm_usage", "usage_rollup_daily", "usage_rollup_user_daily", "usage_rollup_daily_overall",
    "task_metrics", "task_metrics_daily",
)  # fmt: skip


def table_rows(conn: Connection) -> dict[str, int]:
    """Rows of the ledger's tables, as ``<table>_rows``."""
    return {
        f"{table}_rows": conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one()
        for table in COUNTED_TABLES
    }


def ledger_facts(engine: Engine) -> dict[str, Any]:
    """The seeded ledger's size: rows per table, tasks (numbered 1..tasks) and users."""
    with engine.connect() as conn:
        facts: dict[str, Any] = table_rows(conn)
        last_task = conn.execute(
            select(func.max(UsageRollupDaily.task_id)).where(UsageRollupDaily.task_id != "")
        ).scalar_one()
        facts["tasks"] = int(last_task.removeprefix("task-")) if last_task else 0
        facts["users"] = conn.execute(
            select(func.count(func.distinct(UsageRollupUserDaily.user_id)))
        ).scalar_one()
    return facts


def bench_settings(url: str) -> Settings:
    """The service's settings for a benchmark in process: no LLM is called, no migration run."""
    return Settings(
        database_url=url,
        openai_api_key="sk-bench-not-used",  # type: ignore[arg-type]
        openai_base_url="http://127.0.0.1:9/v1",
        spool_dir=Path(tempfile.mkdtemp(prefix="asa-bench-spool-")),
        auto_migrate=False,
        web_session_secret="bench-" + "x" * 40,  # type: ignore[arg-type]
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary_ms(seconds: list[float], digits: int = 2) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 0.5), digits),
        "p95_ms": round(percentile(ms, 0.95), digits),
        "max_ms": round(max(ms), digits),
    }


TASK_STATUSES = ("succeeded",) * 7 + ("failed", "failed", "budget_exceeded", "cancelled", "error")


def seed_tasks(engine: Engine, target: int, seed: int) -> dict[str, float]:
    """A ``tasks`` row per task of the ledger (as its user, created on its day), then older
    call-less ones up to ``target``; nothing when the table is already that big."""
    with engine.connect() as conn:
        have = conn.execute(select(func.count()).select_from(Task)).scalar_one()
    if have >= target:
        return {"tasks_rows": have, "seed_tasks_s": 0.0}
    t0 = time.perf_counter()
    rng = random.Random(seed)
    with engine.begin() as conn:
        r = UsageRollupDaily
        ledger = conn.execute(
            select(r.task_id, func.max(r.user_id), func.min(r.day))
            .where(r.task_id != "")
            .group_by(r.task_id)
        ).all()
        rows: list[dict[str, Any]] = []
        for task_id, user_id, day in ledger:
            day = datetime.fromisoformat(str(day)).replace(tzinfo=UTC)
            rows.append(
                _task(task_id, user_id, day + timedelta(seconds=rng.randrange(70_000)), rng)
            )
        oldest = min((r["created_at"] for r in rows), default=datetime.now(UTC))
        for n in range(max(0, target - len(rows))):
            created = oldest - timedelta(minutes=n + 1)
            rows.append(_task(f"old-{n:08d}", f"user-{rng.randrange(1000):05d}", created, rng))
        for start in range(0, len(rows), 10_000):
            conn.execute(Task.__table__.insert(), rows[start : start + 10_000])
        # Finished here, not by the orchestrator: their outcomes snapshot as a finish would.
        backfill_task_outcomes(conn)
        conn.execute(text("ANALYZE"))
    return {"tasks_rows": len(rows), "seed_tasks_s": round(time.perf_counter() - t0, 1)}


def _task(task_id: str, user_id: str, created: datetime, rng: random.Random) -> dict[str, Any]:
    status = rng.choice(TASK_STATUSES)
    return {
        "id": task_id,
        "user_id": user_id,
        "repo_url": f"https://git.example.com/{user_id}/project-{rng.randrange(50)}.git",
        "ref": None,
        "bug_description": "The parser drops the last line of a file without a newline.",
        "test_command": "pytest -q",
        "model": "gpt-4o-mini",
        "max_cost_pico_usd": None,
        "max_attempts": 3,
        "status": status,
        "step": status,
        "attempts": 1,
        "runs": 1,
        "cancel_requested": False,
        "diff": "--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n-a\n+b\n" if status == "succeeded" else None,
        "tests_before": None,
        "tests_after": None,
        "failure_reason": None,
        "created_at": created,
        "started_at": created + timedelta(seconds=2),
        "finished_at": created + timedelta(seconds=60 + rng.randrange(600)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="SQLAlchemy URL; the database is recreated")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    shape = Shape(args.rows, args.days, args.users, args.seed, datetime.now(UTC).date())
    print(f"seeding {args.rows:,} rows over {args.days} days into {args.db}", flush=True)
    for name, value in seed(args.db, shape).items():
        print(f"  {name}: {value:,.1f}" if isinstance(value, float) else f"  {name}: {value:,}")


if __name__ == "__main__":
    main()
