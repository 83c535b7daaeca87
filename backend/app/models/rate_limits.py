"""The ``rate_limit_buckets`` table: the token buckets every process shares on PostgreSQL.

One row per bucket key (``task_submit:<api key id>``); ``app.core.rate_limit`` reads and
writes it with one atomic UPSERT per check. Times are the database's clock in epoch seconds, so
machines whose clocks disagree still share one bucket. A row whose bucket has been full again
for a while says nothing a missing row does not, and is pruned. The schema is Alembic's.
"""

from __future__ import annotations

from sqlalchemy import Boolean, Double, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base


class RateLimitBucket(Base):
    """``tokens`` left after the last check at ``refilled_at``; ``granted``: that check's answer
    (what the UPSERT's RETURNING reads)."""

    __tablename__ = "rate_limit_buckets"

    bucket_key: Mapped[str] = mapped_column(String(200), primary_key=True)
    tokens: Mapped[float] = mapped_column(Double)
    refilled_at: Mapped[float] = mapped_column(Double, index=True)
    granted: Mapped[bool] = mapped_column(Boolean)
