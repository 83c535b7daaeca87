"""The response of ``GET /api/v1/usage/forecast``: month-end spend projected, with a range."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, Field

from app.schemas.limits import ExactUSD


class UsageForecast(BaseModel):
    scope: Literal["user", "everyone"]
    user_id: str | None = Field(description="Whose spend; null for everyone's.")
    month_start: date
    month_end: date = Field(description="The month's last UTC day.")
    as_of: datetime
    spent_to_date_usd: ExactUSD = Field(description="Spent this month so far, exact.")
    projected_usd: ExactUSD = Field(description="Expected spend by the end of the month.")
    low_usd: ExactUSD = Field(description="Low end of the range (never below spent so far).")
    high_usd: ExactUSD
    confidence: Decimal = Field(description="The share of ordinary months the range covers.")
    history_days: int = Field(description="Days with spend among the 56 the forecast read.")
    weekday_factors: list[float] = Field(
        description="Each weekday's spend relative to an average day, Monday first."
    )
    trend_usd_per_day: ExactUSD = Field(description="Change of daily spend per day.")
    method: str
