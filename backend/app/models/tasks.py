"""Tasks, their events and their named metrics (per task and summed per day)."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, new_id, utcnow


class TaskMetrics(Base):
    """Named per-task measurements (duration, attempts, llm calls, cost, tests before/after)."""

    __tablename__ = "task_metrics"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    task_id: Mapped[str] = mapped_column(String(64), index=True)
    metric_name: Mapped[str] = mapped_column(String(64))
    metric_value: Mapped[Decimal] = mapped_column(Numeric(30, 12, asdecimal=True))
    timestamp: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    # A task's metric is recorded once (the first write wins), so the daily task rollup that is
    # incremented with it never counts a task twice.
    __table_args__ = (
        UniqueConstraint("task_id", "metric_name", name="uq_task_metrics_task_id_metric_name"),
    )


TASK_STATUSES = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "budget_exceeded",
    "cancelled",
    "error",
)
TERMINAL_TASK_STATUSES = frozenset({"succeeded", "failed", "budget_exceeded", "cancelled", "error"})


class Task(Base):
    """A submitted bug-fixing task; the row is the task's durable state and its queue entry."""

    __tablename__ = "tasks"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64))
    repo_url: Mapped[str] = mapped_column(Text)
    ref: Mapped[str | None] = mapped_column(String(255))
    bug_description: Mapped[str] = mapped_column(Text)
    test_command: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(200))
    # Budget-aware model choice (revision 0014): the agents switch to ``fallback_model`` when a
    # call's worst case no longer fits in the task's budget, at ``model_switched_at``.
    fallback_model: Mapped[str | None] = mapped_column(
        String(200), comment="The cheaper model the agents switch to when the budget runs low"
    )
    model_switched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    max_cost_pico_usd: Mapped[int | None] = mapped_column(BigInteger)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    status: Mapped[str] = mapped_column(String(20), default="queued")
    step: Mapped[str] = mapped_column(String(40), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    runs: Mapped[int] = mapped_column(Integer, default=0, comment="Executions started (restarts)")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker_id: Mapped[str | None] = mapped_column(String(64))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    diff: Mapped[str | None] = mapped_column(Text)
    tests_before: Mapped[str | None] = mapped_column(Text, comment="JSON test outcome")
    tests_after: Mapped[str | None] = mapped_column(Text, comment="JSON test outcome")
    failure_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_tasks_status_created_at", "status", "created_at"),
        Index("ix_tasks_user_id_created_at", "user_id", "created_at"),
        # Finished tasks like a running one (app.tasks.projection), newest first.
        Index("ix_tasks_repo_url_model_finished_at", "repo_url", "model", "finished_at"),
        Index("ix_tasks_model_finished_at", "model", "finished_at"),
    )


class TaskEvent(Base):
    """Progress of a task, in order: what a person watching the event stream sees."""

    __tablename__ = "task_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    task_id: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    timestamp: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (Index("ix_task_events_task_id_id", "task_id", "id"),)


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
    ``cost_usd``; see ``app.usage.task_metrics``).
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
