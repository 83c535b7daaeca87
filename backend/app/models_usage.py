"""Usage read models beyond the ledger's core: the overall daily rollup, the daily task rollup,
and the index the task metrics report reads ``task_metrics`` by.

Imported at the bottom of ``app.models`` so that ``Base.metadata`` holds them; the schema is
Alembic's (``alembic/versions/0003_usage_indexes.py``, ``0004_task_metrics_daily.py``).
"""

from __future__ import annotations

from datetime import date

from sqlalchemy import BigInteger, Date, Float, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.models import Base, RollupSums, TaskMetrics


class UsageRollupDailyOverall(RollupSums, Base):
    """The daily rollup summed over users and tasks: one row per (UTC day, model, agent).

    ``usage_rollup_daily`` has a row per task, so a day of a busy service holds tens of
    thousands of them and "everyone's spend this month" would add up a million rows. This
    table answers it from ~20 rows a day. The usage writer increments it in the same
    transaction as the row and the per-task rollup, so the two always agree.
    """

    __tablename__ = "usage_rollup_daily_overall"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    day: Mapped[date] = mapped_column(Date)
    model: Mapped[str] = mapped_column(String(200))
    agent: Mapped[str] = mapped_column(String(64), default="")

    __table_args__ = (
        UniqueConstraint("day", "model", "agent", name="uq_usage_rollup_daily_overall_key"),
    )


# Finished tasks in a window: WHERE metric_name = ? AND timestamp in [since, until). The value
# is in the index so PostgreSQL answers the percentiles from the index alone.
TASK_METRICS_BY_NAME_TIME = Index(
    "ix_task_metrics_metric_name_timestamp",
    TaskMetrics.metric_name,
    TaskMetrics.timestamp,
    TaskMetrics.metric_value,
)


# Upper bounds (seconds) of the task duration buckets kept in task_metrics_daily; the last
# bucket (dur_b23) is the overflow. Roughly 1.5x apart where tasks usually end (1 s to 1 h).
DURATION_BUCKETS_SECONDS: tuple[float, ...] = (
    1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 240, 300, 450, 600, 900, 1200, 1800, 2700, 3600,
    7200, 14400, 43200,
)  # fmt: skip


class TaskMetricsDaily(Base):
    """Finished tasks summed per UTC day of finishing: what ``/usage/metrics/tasks`` reads.

    Incremented in the transaction that records a finished task's ``task_metrics`` rows, and only
    by the rows that write actually inserted, so a task recorded twice counts once. Each column
    group comes from one metric (``succeeded``, ``status.<name>``, ``duration_seconds``,
    ``cost_usd``; see ``app.services.task_metrics_report``).
    """

    __tablename__ = "task_metrics_daily"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    day: Mapped[date] = mapped_column(Date)
    tasks: Mapped[int] = mapped_column(BigInteger, default=0)
    succeeded: Mapped[int] = mapped_column(BigInteger, default=0)
    status_succeeded: Mapped[int] = mapped_column(BigInteger, default=0)
    status_failed: Mapped[int] = mapped_column(BigInteger, default=0)
    status_budget_exceeded: Mapped[int] = mapped_column(BigInteger, default=0)
    status_cancelled: Mapped[int] = mapped_column(BigInteger, default=0)
    status_error: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_tasks: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_pico_usd: Mapped[int] = mapped_column(BigInteger, default=0)
    duration_count: Mapped[int] = mapped_column(BigInteger, default=0)
    duration_sum: Mapped[float] = mapped_column(Float, default=0.0)
    duration_max: Mapped[float] = mapped_column(Float, default=0.0)
    # Duration histogram: non-cumulative counts per DURATION_BUCKETS_SECONDS bucket.
    dur_b00: Mapped[int] = mapped_column(BigInteger, default=0)
    dur_b01: Mapped[int] = mapped_column(BigInteger, default=0)
    dur_b02: Mapped[int] = mapped_column(BigInteger, default=0)
    dur_b03: Mapped[int] = mapped_column(BigInteger, default=0)
    dur_b04: Mapped[int] = mapped_column(BigInteger, default=0)
    dur_b05: Mapped[int] = mapped_column(BigInteger, default=0)
    dur_b06: Mapped[int] = mapped_column(BigInteger, default=0)
    dur_b07: Mapped[int] = mapped_column(BigInteger, default=0)
    dur_b08: Mapped[int] = mapped_column(BigInteger, default=0)
    dur_b09: Mapped[int] = mapped_column(BigInteger, default=0)
    dur_b10: Mapped[int] = mapped_column(BigInteger, default=0)
    dur_b11: Mapped[int] = mapped_column(BigInteger, default=0)
    dur_b12: Mapped[int] = mapped_column(BigInteger, default=0)
    dur_b13: Mapped[int] = mapped_column(BigInteger, default=0)
    dur_b14: Mapped[int] = mapped_column(BigInteger, default=0)
    dur_b15: Mapped[int] = mapped_column(BigInteger, default=0)
    dur_b16: Mapped[int] = mapped_column(BigInteger, default=0)
    dur_b17: Mapped[int] = mapped_column(BigInteger, default=0)
    dur_b18: Mapped[int] = mapped_column(BigInteger, default=0)
    dur_b19: Mapped[int] = mapped_column(BigInteger, default=0)
    dur_b20: Mapped[int] = mapped_column(BigInteger, default=0)
    dur_b21: Mapped[int] = mapped_column(BigInteger, default=0)
    dur_b22: Mapped[int] = mapped_column(BigInteger, default=0)
    dur_b23: Mapped[int] = mapped_column(BigInteger, default=0)

    __table_args__ = (UniqueConstraint("day", name="uq_task_metrics_daily_day"),)
