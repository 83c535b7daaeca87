"""Request and response models of ``/api/v1/admin/prices``."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.usage import ExactUSD


class RecomputeRequest(BaseModel):
    """Which rows to reprice with the service's current prices."""

    model_config = ConfigDict(extra="forbid")

    since: datetime | None = Field(
        default=None, description="ISO 8601, inclusive; naive means UTC; none: from the start."
    )
    until: datetime | None = Field(
        default=None, description="ISO 8601, exclusive; naive means UTC; none: now."
    )
    model: str | None = Field(default=None, min_length=1, max_length=200)
    provider: str | None = Field(default=None, min_length=1, max_length=64)
    dry_run: bool = Field(default=False, description="Only report the totals before and after.")
    wait_seconds: float = Field(
        default=10,
        ge=0,
        le=60,
        description=(
            "How long the request waits for the run to end: 200 with its record if it ended, "
            "else 202 with the running record (progress at its Location); 0 answers at once."
        ),
    )


class RecomputeRun(BaseModel):
    """The audit record of one recompute: who ran it, when, on what, and what it changed."""

    id: str
    actor: str
    status: str = Field(description="running, done or failed")
    dry_run: bool
    started_at: datetime
    finished_at: datetime | None
    since: datetime | None
    until: datetime
    model: str | None
    provider: str | None
    price_sources: list[str] = Field(description="The price sources the run priced with.")
    sources_before: dict[str, int] = Field(
        description="Rows examined per price source before the run ('none': unpriced or unknown)."
    )
    sources_after: dict[str, int]
    rows_examined: int
    rows_changed: int
    cost_before_usd: ExactUSD
    cost_after_usd: ExactUSD
    cost_delta_usd: ExactUSD
    unpriced_before: int
    unpriced_after: int
    error: str | None


class RecomputeRunList(BaseModel):
    items: list[RecomputeRun]
