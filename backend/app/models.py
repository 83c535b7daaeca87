"""The ledger's tables. Alembic owns the schema (``backend/alembic/versions``)."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from app.core.money import pico_to_usd

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class LLMUsage(Base):
    """One row per logical LLM call (SDK retries are counted in ``attempts``, not as rows)."""

    __tablename__ = "llm_usage"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    task_id: Mapped[str | None] = mapped_column(String(64))
    user_id: Mapped[str | None] = mapped_column(String(64))
    agent: Mapped[str | None] = mapped_column(String(64))
    provider: Mapped[str] = mapped_column(String(64), default="openai")
    model: Mapped[str] = mapped_column(String(200))
    response_model: Mapped[str | None] = mapped_column(String(200))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    total_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cached_tokens: Mapped[int] = mapped_column(Integer, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_pico_usd: Mapped[int] = mapped_column(
        BigInteger, default=0, comment="Exact cost in USD x 10^12 (picodollars)"
    )
    cost_status: Mapped[str] = mapped_column(String(16), default="priced")
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    status: Mapped[str] = mapped_column(String(16))
    is_stream: Mapped[bool] = mapped_column(Boolean, default=False)
    is_partial: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    finish_reason: Mapped[str | None] = mapped_column(String(64))
    error_type: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    flags: Mapped[str | None] = mapped_column(String(200))
    trace_id: Mapped[str | None] = mapped_column(String(32))
    span_id: Mapped[str | None] = mapped_column(String(16))
    timestamp: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (
        Index("ix_llm_usage_task_id_timestamp", "task_id", "timestamp"),
        Index("ix_llm_usage_user_id_timestamp", "user_id", "timestamp"),
        Index("ix_llm_usage_timestamp", "timestamp"),
    )

    @property
    def cost_usd(self) -> Decimal:
        return pico_to_usd(self.cost_pico_usd)


# Upper bounds (ms) of the latency buckets kept in the daily rollup; the last is +Inf.
LATENCY_BUCKETS_MS: tuple[float, ...] = (
    5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000,
)  # fmt: skip


class RollupSums:
    """The additive columns every usage rollup carries (one definition for all rollup tables)."""

    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    successes: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    blocked: Mapped[int] = mapped_column(BigInteger, default=0)
    unpriced_calls: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    total_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_pico_usd: Mapped[int] = mapped_column(BigInteger, default=0)
    latency_ms_sum: Mapped[float] = mapped_column(Float, default=0.0)
    # Latency histogram: non-cumulative counts per LATENCY_BUCKETS_MS bucket; b14 is the overflow.
    lat_b00: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b01: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b02: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b03: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b04: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b05: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b06: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b07: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b08: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b09: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b10: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b11: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b12: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b13: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b14: Mapped[int] = mapped_column(BigInteger, default=0)


class UsageRollupDaily(RollupSums, Base):
    """Per-day aggregates, written in the same transaction as each usage row.

    Dimension columns use '' rather than NULL so the natural key is a plain unique constraint.
    """

    __tablename__ = "usage_rollup_daily"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    day: Mapped[date] = mapped_column(Date)
    user_id: Mapped[str] = mapped_column(String(64), default="")
    task_id: Mapped[str] = mapped_column(String(64), default="")
    model: Mapped[str] = mapped_column(String(200))
    agent: Mapped[str] = mapped_column(String(64), default="")

    __table_args__ = (
        UniqueConstraint("day", "user_id", "task_id", "model", "agent", name="uq_usage_rollup_key"),
        Index("ix_usage_rollup_daily_user_id_day", "user_id", "day"),
        Index("ix_usage_rollup_daily_task_id_day", "task_id", "day"),
    )


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


from app import models_api_keys, models_budget, models_usage  # noqa: E402, F401  (their tables)
