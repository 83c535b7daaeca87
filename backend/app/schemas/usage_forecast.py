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


# -- GET /api/v1/usage/anomalies -----------------------------------------------------------------


class SpendAnomaly(BaseModel):
    dimension: Literal["user", "model"]
    subject: str = Field(description="The user id or the model name.")
    hour_start: datetime
    hour_in_progress: bool = Field(description="Judged on the spend of the hour so far.")
    spend_usd: ExactUSD
    baseline_median_usd: ExactUSD = Field(description="Median spend of an active hour.")
    band_upper_usd: ExactUSD = Field(description="Spend above this is out of band.")
    score: float = Field(description="Robust z-score: (spend - median) / (1.4826 x MAD).")


class AnomalyThresholds(BaseModel):
    baseline_hours: int
    min_active_hours: int
    threshold: float
    min_excess_usd: ExactUSD


class UsageAnomalies(BaseModel):
    scope: Literal["user", "everyone"]
    user_id: str | None
    since: datetime = Field(description="The first hour judged.")
    until: datetime = Field(description="The last hour judged (the one in progress).")
    items: list[SpendAnomaly]
    thresholds: AnomalyThresholds
    method: str


# -- GET /api/v1/usage/recommendations -----------------------------------------------------------


class WasteFigures(BaseModel):
    requests: int
    spend_usd: ExactUSD
    failed_calls: int
    failed_spend_usd: ExactUSD
    truncated_calls: int = Field(description="Answers cut at max_tokens (finish_reason=length).")
    truncated_spend_usd: ExactUSD
    retried_calls: int = Field(description="Calls the client retried (attempts > 1).")
    extra_attempts: int
    retried_spend_usd: ExactUSD
    blocked_calls: int = Field(description="Calls a budget refused (they cost nothing).")


class CacheHits(BaseModel):
    model: str
    prompt_tokens: int
    cached_tokens: int
    hit_ratio: float | None


class TaskCostFigures(BaseModel):
    tasks: int = Field(description="Finished tasks (cancelled ones left out).")
    succeeded: int
    failed: int = Field(description="failed, budget_exceeded or error.")
    success_rate: float | None
    succeeded_spend_usd: ExactUSD
    failed_spend_usd: ExactUSD
    cost_per_fixed_bug_usd: ExactUSD | None = Field(
        description="Spend of succeeded tasks over their number."
    )
    all_in_cost_per_fixed_bug_usd: ExactUSD | None = Field(
        description="All the spend (failed tasks' too) over the succeeded tasks."
    )


class ModelTaskCosts(TaskCostFigures):
    model: str = Field(description="The model the tasks were submitted with.")


class AgentTaskCosts(TaskCostFigures):
    agent: str
    model: str = Field(description="The model the agent called.")


class RecommendationOut(BaseModel):
    kind: Literal[
        "failed_calls",
        "truncated_answers",
        "retried_calls",
        "blocked_calls",
        "low_cache_hit",
        "cheaper_model",
    ]
    message: str
    figures: dict[str, int | float | ExactUSD | str | None]
    estimated_savings_usd: ExactUSD | None


class UsageRecommendations(BaseModel):
    scope: Literal["user", "everyone"]
    user_id: str | None
    since: date
    until: date = Field(description="The window's last UTC day (included).")
    days: int
    as_of: datetime = Field(description="When the figures were read (answers are reused briefly).")
    min_tasks: int = Field(description="Finished tasks a model needs before it is compared.")
    waste: WasteFigures
    cache: list[CacheHits]
    models: list[ModelTaskCosts]
    agents: list[AgentTaskCosts]
    recommendations: list[RecommendationOut]
