"""Revision 0004 keeps a task's first metric rows and fills the daily task rollup from them."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from alembic import command
from sqlalchemy import Engine, inspect, select

from app.core.migrations import alembic_config, upgrade_to_head
from app.models import TaskMetrics, TaskMetricsDaily


def row(task_id: str, name: str, value: str, when: datetime) -> dict[str, Any]:
    return {"id": uuid.uuid4().hex, "task_id": task_id, "metric_name": name,
            "metric_value": Decimal(value), "timestamp": when}  # fmt: skip


def test_upgrade_drops_repeated_metrics_and_sums_tasks_per_utc_day(
    database_url: str, engine: Engine
) -> None:
    command.downgrade(alembic_config(database_url), "0003")
    assert "task_metrics_daily" not in inspect(engine).get_table_names()
    late = datetime(2026, 1, 1, 23, 59, 59, 999999, tzinfo=UTC)
    next_day = datetime(2026, 1, 2, tzinfo=UTC)
    rows = [
        row("a", "succeeded", "1", late), row("a", "duration_seconds", "15", late),
        row("a", "cost_usd", "0.000000000003", late), row("a", "status.succeeded", "1", late),
        # a's finish written again later: dropped, the earliest row is kept
        row("a", "succeeded", "0", next_day), row("a", "duration_seconds", "999", next_day),
        row("b", "succeeded", "0", late), row("b", "duration_seconds", "100000", late),
        row("b", "cost_usd", "1.5", late), row("b", "status.failed", "1", late),
        row("c", "succeeded", "1", next_day), row("c", "duration_seconds", "0.5", next_day),
        row("c", "attempts", "2", next_day),
    ]  # fmt: skip
    with engine.begin() as conn:
        conn.execute(TaskMetrics.__table__.insert(), rows)

    upgrade_to_head(database_url)

    table: Any = TaskMetricsDaily.__table__
    with engine.connect() as conn:
        kept = conn.execute(
            select(TaskMetrics.metric_value).where(
                TaskMetrics.task_id == "a", TaskMetrics.metric_name == "duration_seconds"
            )
        ).scalars()
        days = {r["day"]: r for r in conn.execute(select(table)).mappings()}
    assert [float(v) for v in kept] == [15.0]
    assert set(days) == {date(2026, 1, 1), date(2026, 1, 2)}
    first, second = days[date(2026, 1, 1)], days[date(2026, 1, 2)]
    assert (first["tasks"], first["succeeded"], first["status_succeeded"]) == (2, 1, 1)
    assert (first["status_failed"], first["cost_tasks"]) == (1, 2)
    assert first["cost_pico_usd"] == 1_500_000_000_003
    assert (first["duration_count"], first["duration_sum"], first["duration_max"]) == (
        2, 100015.0, 100000.0,
    )  # fmt: skip
    assert (first["dur_b04"], first["dur_b23"]) == (1, 1)  # (10, 20] and the overflow
    assert (second["tasks"], second["succeeded"], second["cost_tasks"]) == (1, 1, 0)
    assert (second["duration_count"], second["duration_max"], second["dur_b00"]) == (1, 0.5, 1)
