"""Request and response bodies of the task API."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.schemas.text import StorableText

TaskStatus = Literal[
    "queued", "running", "succeeded", "failed", "budget_exceeded", "cancelled", "error"
]
MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}$"


class TaskSubmitRequest(BaseModel):
    """The seed's request (repo_url, bug_description, test_command) and optional controls."""

    model_config = ConfigDict(extra="forbid")

    repo_url: StorableText = Field(
        min_length=1, max_length=2048, examples=["https://github.com/example/repo"]
    )
    bug_description: StorableText = Field(min_length=1, max_length=20_000)
    test_command: StorableText = Field(min_length=1, max_length=2_000, examples=["pytest"])
    model: StorableText | None = Field(default=None, pattern=MODEL_PATTERN)
    max_cost_usd: Decimal | None = Field(
        default=None,
        gt=0,
        le=10_000,
        max_digits=18,
        decimal_places=12,
        description="Lowers the task's cost cap (BUDGET_TASK_MAX_USD). Only an administrator "
        "may raise it: a user's higher value is lowered to the cap that applies.",
    )
    max_attempts: int = Field(default=3, ge=1, le=10)
    ref: StorableText | None = Field(default=None, min_length=1, max_length=255)
    fallback_model: StorableText | None = Field(
        default=None,
        pattern=MODEL_PATTERN,
        description="Opt-in: a cheaper model the agents switch to (for the rest of the task) "
        "when a call's worst case would exceed what the task's budget has left.",
    )

    @model_validator(mode="after")
    def _fallback_is_another_model(self) -> TaskSubmitRequest:
        if self.fallback_model is not None and self.fallback_model == self.model:
            raise ValueError("fallback_model must differ from model")
        return self

    @field_validator("bug_description", "test_command")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value


class TaskSubmitted(BaseModel):
    task_id: str
    status: TaskStatus
    status_url: str
    events_url: str
    max_cost_usd: Decimal | None = Field(
        default=None,
        description="The cost cap that applies to the task: your max_cost_usd, lowered to the "
        "administrator's cap if it was higher; the cap itself when you set none; null: none.",
    )


class TestOutcome(BaseModel):
    __test__ = False  # not a pytest test class

    exit_code: int | None = None
    passed: int | None = None
    failed: int | None = None
    timed_out: bool = False
    summary: str = ""


class TaskResult(BaseModel):
    diff: str | None
    tests_before: TestOutcome | None
    tests_after: TestOutcome | None
    failure_reason: str | None


class TaskView(BaseModel):
    task_id: str
    status: TaskStatus
    step: str
    attempts: int
    max_attempts: int
    model: str
    repo_url: str
    ref: str | None
    bug_description: str
    test_command: str
    cost_usd: Decimal = Field(description="Exact spend of the task's LLM calls so far")
    max_cost_usd: Decimal | None
    llm_calls: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    status_url: str
    result: TaskResult | None = Field(description="Present once the task has finished")
    projected_cost_usd: Decimal | None = Field(
        default=None,
        description="A queued or running task's expected final cost (never above its cap); "
        "null once finished (cost_usd is final) or while nothing is known yet.",
    )
    projected_cost_low_usd: Decimal | None = Field(default=None)
    projected_cost_high_usd: Decimal | None = Field(default=None)
    projected_cost_basis: Literal["similar_tasks", "progress"] | None = Field(
        default=None,
        description="similar_tasks: the median of finished tasks like it (same repository and "
        "model) that cost at least as much as it has spent; progress: its attempts' average "
        "cost for every attempt it may still make.",
    )
    projected_cost_samples: int | None = Field(
        default=None, description="How many similar tasks the projection is made of."
    )
    fallback_model: str | None = Field(
        default=None, description="The cheaper model asked for when the budget runs low."
    )
    model_switched_at: datetime | None = Field(
        default=None,
        description="When the agents switched to fallback_model (null: they did not).",
    )


class TaskPage(BaseModel):
    items: list[TaskView]
    total: int
    limit: int
    offset: int


class TaskEventView(BaseModel):
    id: int
    kind: str
    message: str
    timestamp: datetime

    def sse(self) -> dict[str, Any]:
        return {"id": str(self.id), "event": self.kind, "data": self.model_dump_json()}
