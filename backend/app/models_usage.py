"""Usage read models beyond the ledger's core: the overall daily rollup, and the index the task
metrics report reads ``task_metrics`` by.

Imported at the bottom of ``app.models`` so that ``Base.metadata`` holds them; the schema is
Alembic's (``alembic/versions/0003_usage_indexes.py``).
"""

from __future__ import annotations

from datetime import date

from sqlalchemy import BigInteger, Date, Float, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.models import Base, TaskMetrics


class UsageRollupDailyOverall(Base):
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
    # Same buckets as usage_rollup_daily (LATENCY_BUCKETS_MS); b14 is the overflow.
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
