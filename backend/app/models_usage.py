"""Usage read models beyond the ledger's core: the overall daily rollup, and the index the task
metrics report reads ``task_metrics`` by.

Imported at the bottom of ``app.models`` so that ``Base.metadata`` holds them; the schema is
Alembic's (``alembic/versions/0003_usage_indexes.py``).
"""

from __future__ import annotations

from datetime import date

from sqlalchemy import BigInteger, Date, Index, Integer, String, UniqueConstraint
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
