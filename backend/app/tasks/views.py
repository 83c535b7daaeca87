"""Turn task rows into the API's views."""

from __future__ import annotations

import json

from app.core.money import pico_to_usd
from app.models import TERMINAL_TASK_STATUSES, Task
from app.schemas.tasks import TaskResult, TaskView, TestOutcome
from app.tasks.projection import CostProjection, projection_usd


def _outcome(raw: str | None) -> TestOutcome | None:
    return TestOutcome.model_validate(json.loads(raw)) if raw else None


def task_view(
    task: Task,
    spend: tuple[int, int],
    status_url: str,
    projection: CostProjection | None = None,
) -> TaskView:
    """The task as the API shows it; ``projection``: its projected final cost, when computed
    (``app.tasks.projection``; the single task's status has it, a page of tasks does not)."""
    cost_pico, calls = spend
    finished = task.status in TERMINAL_TASK_STATUSES
    return TaskView(
        task_id=task.id,
        status=task.status,
        step=task.step,
        attempts=task.attempts,
        max_attempts=task.max_attempts,
        model=task.model,
        repo_url=task.repo_url,
        ref=task.ref,
        bug_description=task.bug_description,
        test_command=task.test_command,
        cost_usd=pico_to_usd(cost_pico),
        max_cost_usd=pico_to_usd(task.max_cost_pico_usd) if task.max_cost_pico_usd else None,
        llm_calls=calls,
        fallback_model=task.fallback_model,
        model_switched_at=task.model_switched_at,
        created_at=task.created_at,
        started_at=task.started_at,
        finished_at=task.finished_at,
        status_url=status_url,
        result=TaskResult(
            diff=task.diff,
            tests_before=_outcome(task.tests_before),
            tests_after=_outcome(task.tests_after),
            failure_reason=task.failure_reason,
        )
        if finished
        else None,
        **projection_usd(projection),
    )
