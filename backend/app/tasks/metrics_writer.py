"""Recording a finished task's metrics: the ``task_metrics`` rows and the daily task rollup.

One call writes both in the caller's transaction. A (task, metric) pair is recorded once: the
rows go in with ``ON CONFLICT DO NOTHING`` on ``(task_id, metric_name)`` and the rollup
(``task_metrics_daily``, keyed by the UTC day of ``finished_at``) is incremented only by the
rows that were actually inserted, so recording a task twice changes nothing the second time.
What each metric means is specified in ``app.usage.task_metrics``.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, func
from sqlalchemy.dialects import postgresql, sqlite

from app.core.money import usd_to_pico
from app.models import DURATION_BUCKETS_SECONDS, TaskMetrics, TaskMetricsDaily, new_id

SUCCEEDED = "succeeded"
DURATION_SECONDS = "duration_seconds"
COST_USD = "cost_usd"
STATUS_PREFIX = "status."
TASK_STATUSES: tuple[str, ...] = ("succeeded", "failed", "budget_exceeded", "cancelled", "error")

DURATION_BUCKET_COLUMNS: tuple[str, ...] = tuple(
    f"dur_b{i:02d}" for i in range(len(DURATION_BUCKETS_SECONDS) + 1)
)
# Every column of task_metrics_daily that a write adds to (duration_max is a maximum).
ROLLUP_SUMS: tuple[str, ...] = (
    "tasks", "succeeded", *(f"status_{s}" for s in TASK_STATUSES), "cost_tasks", "cost_pico_usd",
    "duration_count", "duration_sum", *DURATION_BUCKET_COLUMNS,
)  # fmt: skip


def fix_attempt_step(attempt: int) -> str:
    """The step event the orchestrator records as fix attempt ``attempt`` starts. The task-costs
    report finds a task's retries from its second one's (``app.usage.task_metrics``), in events
    stored long ago too: the wording is part of the data."""
    return f"attempt {attempt}: asking FixAgent for a fix"


def duration_bucket(seconds: Decimal | float) -> int:
    """Index of the duration bucket holding ``seconds`` (upper bounds inclusive)."""
    return bisect.bisect_left(DURATION_BUCKETS_SECONDS, seconds)


def rollup_delta(metrics: Mapping[str, Decimal]) -> dict[str, Any]:
    """What a task's newly recorded ``metrics`` add to its day's ``task_metrics_daily`` row."""
    delta: dict[str, Any] = dict.fromkeys(ROLLUP_SUMS, 0)
    delta["duration_sum"] = 0.0
    delta["duration_max"] = 0.0
    if (succeeded := metrics.get(SUCCEEDED)) is not None:
        delta["tasks"] = 1
        delta["succeeded"] = int(succeeded == 1)
    for status in TASK_STATUSES:
        if (flag := metrics.get(STATUS_PREFIX + status)) is not None:
            delta[f"status_{status}"] = int(flag == 1)
    if (cost := metrics.get(COST_USD)) is not None:
        delta["cost_tasks"] = 1
        delta["cost_pico_usd"] = usd_to_pico(cost)
    if (duration := metrics.get(DURATION_SECONDS)) is not None:
        delta["duration_count"] = 1
        delta["duration_sum"] = delta["duration_max"] = float(duration)
        delta[DURATION_BUCKET_COLUMNS[duration_bucket(duration)]] = 1
    return delta


def _insert(conn: Connection) -> Any:
    if conn.dialect.name == "postgresql":
        return postgresql.insert
    if conn.dialect.name == "sqlite":
        return sqlite.insert
    raise NotImplementedError(f"Unsupported database dialect: {conn.dialect.name}")


def _insert_new(
    conn: Connection, task_id: str, metrics: Mapping[str, Decimal], stamp: datetime
) -> set[str]:
    """Insert the rows the task does not have yet; the names inserted."""
    if not metrics:
        return set()
    table: Any = TaskMetrics.__table__
    rows = [
        {"id": new_id(), "task_id": task_id, "metric_name": name, "metric_value": value,
         "timestamp": stamp}
        for name, value in metrics.items()
    ]  # fmt: skip
    inserted = conn.execute(
        _insert(conn)(table)
        .values(rows)
        .on_conflict_do_nothing(index_elements=["task_id", "metric_name"])
        .returning(table.c.metric_name)
    )
    return set(inserted.scalars())


def record_task_metrics(
    conn: Connection, task_id: str, metrics: Mapping[str, Decimal], finished_at: datetime
) -> set[str]:
    """Record ``metrics`` of a task that finished at ``finished_at`` (timezone-aware); the names
    recorded.

    A task finishes once: when its ``succeeded`` row is already there, nothing is recorded (the
    unique key decides between two concurrent writers). Any other (task, metric) pair already
    recorded keeps its first value.
    """
    stamp = finished_at.astimezone(UTC)
    new_names = set()
    if SUCCEEDED in metrics:
        new_names = _insert_new(conn, task_id, {SUCCEEDED: metrics[SUCCEEDED]}, stamp)
        if not new_names:
            return new_names
    others = {name: value for name, value in metrics.items() if name != SUCCEEDED}
    new_names |= _insert_new(conn, task_id, others, stamp)
    delta = rollup_delta({name: metrics[name] for name in new_names})
    if not any(delta[name] for name in ROLLUP_SUMS):
        return new_names
    rollup: Any = TaskMetricsDaily.__table__
    add = _insert(conn)(rollup).values(day=stamp.date(), **delta)
    greatest = func.greatest if conn.dialect.name == "postgresql" else func.max
    conn.execute(
        add.on_conflict_do_update(
            index_elements=["day"],
            set_={
                **{name: rollup.c[name] + add.excluded[name] for name in ROLLUP_SUMS},
                "duration_max": greatest(rollup.c.duration_max, add.excluded.duration_max),
            },
        )
    )
    return new_names
