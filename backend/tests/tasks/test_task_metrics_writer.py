"""Recording finished tasks: each (task, metric) once, and the daily task rollup kept with it.

On SQLite and PostgreSQL; every figure is computed by hand from the tasks written here.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from app.models import TaskMetrics, TaskMetricsDaily
from app.tasks import store as task_store
from app.usage.report import usage_window
from app.usage.task_metrics import task_metrics

NOW = datetime(2026, 3, 10, 15, 30, tzinfo=UTC)


def finish(engine: Engine, task_id: str, when: datetime, **metrics: str) -> None:
    values = {name.replace("__", "."): Decimal(value) for name, value in metrics.items()}
    with Session(engine) as session, session.begin():
        task_store.write_task_metrics(session, task_id, values, when)


def rollup(engine: Engine) -> dict[date, dict[str, Any]]:
    table: Any = TaskMetricsDaily.__table__
    with engine.connect() as conn:
        rows = conn.execute(select(table).order_by(table.c.day)).mappings().all()
    return {row["day"]: dict(row) for row in rows}


def metric_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(TaskMetrics)).scalar_one())


def test_a_task_recorded_twice_counts_once(engine: Engine) -> None:
    finish(engine, "t1", NOW, succeeded="1", duration_seconds="12.5", cost_usd="0.25",
           status__succeeded="1")  # fmt: skip
    before = rollup(engine)

    finish(engine, "t1", NOW + timedelta(days=1), succeeded="0", duration_seconds="99",
           cost_usd="7", status__failed="1", attempts="2")  # fmt: skip

    assert rollup(engine) == before
    assert metric_rows(engine) == 4
    day = before[date(2026, 3, 10)]
    assert (day["tasks"], day["succeeded"], day["status_succeeded"], day["status_failed"]) == (
        1, 1, 1, 0,
    )  # fmt: skip
    assert (day["cost_tasks"], day["cost_pico_usd"]) == (1, 250_000_000_000)
    assert (day["duration_count"], day["duration_sum"], day["duration_max"]) == (1, 12.5, 12.5)
    assert day["dur_b04"] == 1  # (10, 20]


def test_a_metric_already_recorded_keeps_its_first_value(engine: Engine) -> None:
    finish(engine, "t1", NOW, cost_usd="1")
    finish(engine, "t1", NOW, cost_usd="2", duration_seconds="3")

    day = rollup(engine)[date(2026, 3, 10)]
    assert (day["tasks"], day["cost_tasks"], day["cost_pico_usd"]) == (0, 1, 10**12)
    assert (day["duration_count"], day["dur_b02"]) == (1, 1)  # 3 s is in (2, 5]


def test_tasks_land_on_the_utc_day_they_finished(engine: Engine) -> None:
    last_microsecond = datetime(2026, 3, 9, 23, 59, 59, 999999, tzinfo=UTC)
    plus_two = timezone(timedelta(hours=2))
    finish(engine, "a", last_microsecond, succeeded="1", duration_seconds="1")
    finish(engine, "b", datetime(2026, 3, 10, tzinfo=UTC), succeeded="1", duration_seconds="2")
    # 01:00 at UTC+2 on the 10th is 23:00 UTC on the 9th.
    finish(engine, "c", datetime(2026, 3, 10, 1, 0, tzinfo=plus_two), succeeded="0",
           duration_seconds="4")  # fmt: skip

    days = rollup(engine)
    assert {d: (r["tasks"], r["succeeded"], r["duration_sum"]) for d, r in days.items()} == {
        date(2026, 3, 9): (2, 1, 5.0),
        date(2026, 3, 10): (1, 1, 2.0),
    }
    with Session(engine) as session:
        today = task_metrics(session, usage_window(1, NOW))
    assert (today.tasks, today.duration_seconds.max) == (1, 2.0)


def test_report_from_the_rollup_agrees_with_the_rows(engine: Engine) -> None:
    durations = ["0.5", "7", "61", "61", "200", "3599", "50000"]
    for n, seconds in enumerate(durations):
        status = ("succeeded", "failed", "cancelled")[n % 3]
        finish(engine, f"t{n}", NOW - timedelta(days=n % 2), succeeded=str(int(n % 3 == 0)),
               duration_seconds=seconds, cost_usd=f"0.{n}00000000001",
               **{f"status__{status}": "1"})  # fmt: skip
    window = usage_window(7, NOW)

    with Session(engine) as session:
        rolled = task_metrics(session, window)
        raw = task_metrics(session, window, source="raw")

    assert rolled.model_dump(exclude={"duration_seconds"}) == raw.model_dump(
        exclude={"duration_seconds"}
    )
    assert (rolled.tasks, rolled.succeeded, rolled.by_status) == (
        7, 3, {"succeeded": 3, "failed": 2, "cancelled": 2},
    )  # fmt: skip
    assert rolled.cost.total_usd == Decimal("2.100000000007")
    d, exact = rolled.duration_seconds, raw.duration_seconds
    assert (d.count, d.max) == (exact.count, exact.max) == (7, 50000.0)
    assert d.avg == pytest.approx(exact.avg) == pytest.approx(53928.5 / 7)
    # p50: rank 3.5 of 7; 0.5 and 7 are below (60, 90], which holds the two 61s: 1.5 into it.
    assert d.p50 == pytest.approx(60 + 30 * 1.5 / 2)
    # p99: rank 6.93, in the overflow bucket (> 43200 s), which ends at the maximum.
    assert d.p99 == pytest.approx(43200 + (50000 - 43200) * 0.93)
