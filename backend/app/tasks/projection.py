"""A running task's projected final cost, from its progress and from finished tasks like it.

``project_task_cost``, for a queued or running task that has spent ``S`` so far:

1. **Similar tasks**: the final cost (``task_metrics.cost_usd``) of the latest
   ``MAX_SIMILAR`` (200) finished tasks with the same repository and model; fewer than
   ``MIN_SIMILAR`` (5) of them: with the same model on any repository.
2. **Conditioned on progress**: only those that cost at least ``S`` are like this task *now* (a
   task that has spent $3 will not end at a similar task's $1). With at least ``MIN_SIMILAR`` of
   them, the projection is their median and the range their 20th to 80th percentile
   (``basis = similar_tasks``; ``samples`` says how many).
3. **Progress alone** otherwise, once an attempt has started: what the attempts so far cost on
   average, for every attempt the task may still make (``basis = progress``; the upper end: a
   task that succeeds early costs less).
4. Never above the task's cost cap (its budget stops it there) nor below ``S``.

A finished task has no projection: its ``cost_usd`` is final.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.money import pico_to_usd, usd_to_pico
from app.models import Task, TaskMetrics

MAX_SIMILAR = 200
MIN_SIMILAR = 5
FINISHED = ("succeeded", "failed", "budget_exceeded", "error")
Basis = Literal["similar_tasks", "progress"]


@dataclass(frozen=True, slots=True)
class CostProjection:
    projected_pico: int
    low_pico: int
    high_pico: int
    basis: Basis
    samples: int  # similar tasks the projection is the median of (0 for progress)


def similar_costs(session: Session, task: Task, *, same_repo: bool) -> list[int]:
    """Final costs (picodollars) of the latest finished tasks with the task's model (and
    repository), newest first."""
    query = (
        select(TaskMetrics.metric_value)
        .join(Task, Task.id == TaskMetrics.task_id)
        .where(
            TaskMetrics.metric_name == "cost_usd",
            Task.model == task.model,
            Task.status.in_(FINISHED),
            Task.id != task.id,
        )
        .order_by(Task.finished_at.desc())
        .limit(MAX_SIMILAR)
    )
    if same_repo:
        query = query.where(Task.repo_url == task.repo_url)
    return [usd_to_pico(Decimal(str(value))) for value in session.execute(query).scalars()]


def _quantile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def project_task_cost(session: Session, task: Task, spent_pico: int) -> CostProjection | None:
    """The projection of a queued or running task (None for a finished one, or while nothing
    is known: no similar task and no attempt yet)."""
    if task.status not in ("queued", "running"):
        return None
    costs = similar_costs(session, task, same_repo=True)
    if len(costs) < MIN_SIMILAR:
        costs = similar_costs(session, task, same_repo=False)
    reachable = [cost for cost in costs if cost >= spent_pico]
    projection: CostProjection | None = None
    if len(reachable) >= MIN_SIMILAR:
        projection = CostProjection(
            projected_pico=int(statistics.median(reachable)),
            low_pico=_quantile(reachable, 0.2),
            high_pico=_quantile(reachable, 0.8),
            basis="similar_tasks",
            samples=len(reachable),
        )
    elif task.attempts > 0 and spent_pico > 0:
        per_attempt = spent_pico // task.attempts
        most = spent_pico + per_attempt * max(0, task.max_attempts - task.attempts)
        projection = CostProjection(most, spent_pico, most, "progress", 0)
    if projection is None:
        return None
    cap = task.max_cost_pico_usd

    def bounded(pico: int) -> int:
        pico = max(pico, spent_pico)
        return min(pico, cap) if cap is not None else pico

    return CostProjection(
        projected_pico=bounded(projection.projected_pico),
        low_pico=bounded(projection.low_pico),
        high_pico=bounded(projection.high_pico),
        basis=projection.basis,
        samples=projection.samples,
    )


def projection_usd(projection: CostProjection | None) -> dict[str, object]:
    """The task view's projection fields."""
    if projection is None:
        return {}
    return {
        "projected_cost_usd": pico_to_usd(projection.projected_pico),
        "projected_cost_low_usd": pico_to_usd(projection.low_pico),
        "projected_cost_high_usd": pico_to_usd(projection.high_pico),
        "projected_cost_basis": projection.basis,
        "projected_cost_samples": projection.samples,
    }
