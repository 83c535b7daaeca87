"""Response models of ``/api/v1/usage``.

Money is exact: ``cost_usd`` fields are decimal strings (``"0.0123"``), never floats, so sums
read back from the API add up to the cent and below. Latency figures are floats in milliseconds.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

# Exact decimal, rendered as a plain JSON string: fixed-point ("0.0000001", never "1E-7"), and
# typed "string" in the OpenAPI schema.
ExactUSD = Annotated[
    Decimal,
    PlainSerializer(lambda value: format(value, "f"), return_type=str, when_used="json"),
    Field(description='US dollars as an exact decimal string, e.g. "0.001275".'),
]


class UsageWindow(BaseModel):
    """The time range a report covers: ``[since, until)`` in UTC.

    ``days=N`` covers N whole UTC calendar days ending today: ``since`` is 00:00 UTC of the day
    N-1 days before today, ``until`` is 00:00 UTC tomorrow (so everything up to now is in).
    """

    days: int
    since: datetime
    until: datetime


class UsageTotals(BaseModel):
    """Sums over the calls in scope. ``requests = successes + errors + blocked``."""

    model_config = ConfigDict(from_attributes=True)

    requests: int
    successes: int
    errors: int
    blocked: int = Field(description="Calls refused by a budget before reaching the provider.")
    unpriced_calls: int = Field(description="Calls to models without a known price (cost 0).")
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    total_tokens: int
    cost_usd: ExactUSD
    avg_latency_ms: float | None = Field(
        description="Mean latency of all recorded calls; null when there are none."
    )
    p95_latency_ms: float | None = Field(
        description=(
            "Estimated 95th percentile latency: linear interpolation inside the daily rollup's "
            "latency bucket (as Prometheus' histogram_quantile), so exact only to the bucket's "
            "resolution (bounds 5, 10, 25, 50, 100, 250, 500 ms, 1, 2.5, 5, 10, 30, 60, 120 s). "
            "Null when there are no calls."
        )
    )


class ModelUsage(UsageTotals):
    model: str


class DayUsage(UsageTotals):
    day: date = Field(description="UTC calendar day.")


class AgentUsage(UsageTotals):
    agent: str | None = Field(description="The agent that made the calls; null when unset.")


class ProviderUsage(UsageTotals):
    provider: str | None = Field(
        description=(
            "The provider that served the calls (gen_ai.provider.name, e.g. 'openai'); null for "
            "calls whose provider the ledger no longer knows (pruned before it was recorded in "
            "the rollups)."
        )
    )


class OperationUsage(UsageTotals):
    operation: str | None = Field(
        description=(
            "The OpenAI API called: 'chat', 'responses' or 'embeddings'; null as for provider."
        )
    )


class UsageBreakdowns(BaseModel):
    totals: UsageTotals
    by_model: list[ModelUsage] = Field(description="Most expensive first, then by name.")
    by_day: list[DayUsage] = Field(description="Days with calls only, oldest first.")
    by_provider: list[ProviderUsage] = Field(
        default_factory=list, description="Most expensive first, then by name."
    )
    by_operation: list[OperationUsage] = Field(
        default_factory=list, description="Most expensive first, then by name."
    )


class TaskUsageResponse(UsageBreakdowns):
    """Everything a task's calls cost, over its whole life."""

    task_id: str
    user_ids: list[str] = Field(description="The users the task's calls were made for.")
    by_agent: list[AgentUsage] = Field(description="Most expensive first, then by name.")


class UserUsageResponse(UsageBreakdowns):
    user_id: str
    window: UsageWindow


class OverallUsageResponse(UsageBreakdowns):
    window: UsageWindow


class DurationStats(BaseModel):
    """Task durations in seconds. ``count``, ``avg`` and ``max`` are exact; the percentiles are
    estimated from a daily duration histogram (linear interpolation inside the bucket holding
    the rank, never above ``max``), accurate to the bucket's width."""

    count: int
    avg: float | None
    p50: float | None
    p90: float | None
    p95: float | None
    p99: float | None
    max: float | None


class TaskPhaseCost(BaseModel):
    phase: str = Field(
        description="An agent label (FixAgent, TestGenerator, CodeAgent, ...; '(none)' for "
        "calls without one), or 'retries': the spend of fix attempts after the first."
    )
    tasks: int = Field(description="Finished tasks with calls in this phase.")
    total_usd: ExactUSD


class TaskCostStats(BaseModel):
    tasks_with_cost: int
    total_usd: ExactUSD
    avg_per_task_usd: ExactUSD | None = Field(
        description="total_usd / tasks_with_cost, rounded half-even to 12 decimal places."
    )
    succeeded_tasks_with_cost: int = 0
    succeeded_total_usd: ExactUSD = Decimal(0)
    per_succeeded_task_usd: ExactUSD | None = Field(
        default=None,
        description="What the succeeded tasks cost over their number (succeeded_total_usd / "
        "succeeded_tasks_with_cost), rounded half-even to 12 decimal places.",
    )
    by_phase: list[TaskPhaseCost] = Field(
        default_factory=list,
        description="The finished tasks' spend per phase, from the ledger's rollups; 'retries' "
        "overlaps the agents' (it is their spend from the second fix attempt on).",
    )


class TaskMetricsResponse(BaseModel):
    """Finished tasks in the window, from the daily rollup of the ``task_metrics`` rows the
    orchestrator writes."""

    window: UsageWindow
    tasks: int = Field(description="Tasks that finished in the window (have a 'succeeded' row).")
    succeeded: int
    failed: int
    success_rate: float | None = Field(description="succeeded / tasks; null when no tasks.")
    by_status: dict[str, int] = Field(
        description="Counts of 'status.<name>' rows, e.g. {'succeeded': 3, 'budget_exceeded': 1}."
    )
    duration_seconds: DurationStats
    cost: TaskCostStats
