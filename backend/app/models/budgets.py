"""The budget tables: live counters per scope and window, open reservations, limit overrides.

The schema is Alembic's (``alembic/versions/0002_budgets.py``)."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum

from sqlalchemy import BigInteger, Boolean, Date, DateTime, Index, Numeric, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, utcnow


class BudgetScope(StrEnum):
    """What a limit applies to; also the ``scope`` label of the budget metrics."""

    TASK = "task"
    USER_DAILY = "user_daily"
    USER_MONTHLY = "user_monthly"
    GLOBAL_DAILY = "global_daily"
    KEY = "key"  # a gateway API key's own budget, over the key's whole life


class BudgetCounter(Base):
    """Spend and open reservations of one scope in one window, in picodollars.

    ``scope`` is ``task``, ``user_daily``, ``user_monthly``, ``global_daily`` or ``key``;
    ``subject_id`` is the task, user or API key id ('' for the global scope); ``window_start`` is
    the UTC day, the first day of the UTC month, or 1970-01-01 for a task or a key (whose one
    window is its whole life).
    """

    __tablename__ = "budget_counter"

    scope: Mapped[str] = mapped_column(String(16), primary_key=True)
    subject_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    window_start: Mapped[date] = mapped_column(Date, primary_key=True)
    spent_pico_usd: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved_pico_usd: Mapped[int] = mapped_column(BigInteger, default=0)
    soft_warned: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class BudgetReservation(Base):
    """One call's worst-case cost, held on its counters until the call settles or expires."""

    __tablename__ = "budget_reservation"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    amount_pico_usd: Mapped[int] = mapped_column(BigInteger)
    task_id: Mapped[str | None] = mapped_column(String(64))
    user_id: Mapped[str | None] = mapped_column(String(64))
    key_id: Mapped[str | None] = mapped_column(String(32))  # the gateway key it was taken for
    window_day: Mapped[date] = mapped_column(Date, comment="UTC day (and so month) it was taken")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_budget_reservation_expires_at", "expires_at"),)


class BudgetLimitOverride(Base):
    """An administrator's limit for one scope and subject; wins over the environment default.

    A NULL ``limit_pico_usd`` means explicitly unlimited; a NULL ``soft_threshold`` means the
    default threshold.
    """

    __tablename__ = "budget_limit_override"

    scope: Mapped[str] = mapped_column(String(16), primary_key=True)
    subject_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    limit_pico_usd: Mapped[int | None] = mapped_column(BigInteger)
    soft_threshold: Mapped[Decimal | None] = mapped_column(Numeric(5, 4, asdecimal=True))
    updated_by: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
