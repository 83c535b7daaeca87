"""Requests and responses of ``/api/v1/limits`` (budget limits and where each scope stands).

Money is exact: USD amounts are decimal strings in responses (``"0.000150"``, never floats) and
may be sent as strings or numbers, with at most 12 decimal places (a picodollar).
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

from app.models import BudgetScope

ExactUSD = Annotated[
    Decimal,
    PlainSerializer(lambda value: format(value, "f"), return_type=str, when_used="json"),
    Field(description='US dollars as an exact decimal string, e.g. "0.001275".'),
]
MAX_LIMIT_USD = Decimal(1_000_000)


class LimitOverrideIn(BaseModel):
    """An override for one scope: ``limit_usd`` null means explicitly unlimited."""

    model_config = ConfigDict(extra="forbid")

    limit_usd: Decimal | None = Field(
        ge=0,
        le=MAX_LIMIT_USD,
        decimal_places=12,
        description="The cap in USD (0 refuses every call); null = unlimited for this subject.",
        examples=["5.00"],
    )
    soft_threshold: Decimal | None = Field(
        default=None,
        gt=0,
        le=1,
        decimal_places=4,
        description="Share of the limit that logs a warning once per window; null = default.",
        examples=["0.8"],
    )


class ScopeBudget(BaseModel):
    """One scope of one subject in its current window."""

    scope: BudgetScope
    subject_id: str | None = Field(description="The task or user id; null for the global scope.")
    window: Literal["lifetime", "day", "month"]
    window_start: date | None = Field(description="First UTC day of the window; null for a task.")
    window_end: date | None = Field(description="First UTC day after the window (exclusive).")
    limit_usd: ExactUSD | None = Field(description="The effective cap; null = unlimited.")
    limit_source: Literal["override", "default", "none"] = Field(
        description="An administrator's override, the environment default, or no limit at all."
    )
    soft_threshold: Decimal
    spent_usd: ExactUSD
    reserved_usd: ExactUSD = Field(description="Held by calls in flight (their worst case).")
    remaining_usd: ExactUSD | None = Field(description="limit - spent - reserved, at least 0.")


class UserBudgets(BaseModel):
    user_id: str
    daily: ScopeBudget
    monthly: ScopeBudget


class LimitOverride(BaseModel):
    """A stored override."""

    scope: BudgetScope
    subject_id: str | None
    limit_usd: ExactUSD | None
    soft_threshold: Decimal | None
    updated_by: str | None
    updated_at: datetime


class LimitOverrideList(BaseModel):
    items: list[LimitOverride]
    limit: int
    offset: int


class BudgetExceededBody(BaseModel):
    """The 402 body of a call refused by a budget (``BudgetExceededError``)."""

    error: Literal["budget_exceeded"]
    detail: str
    scope: BudgetScope
    subject_id: str | None
    window_start: date | None
    window_end: date | None
    limit_usd: ExactUSD
    spent_usd: ExactUSD
    reserved_usd: ExactUSD
    remaining_usd: ExactUSD
    requested_usd: ExactUSD
