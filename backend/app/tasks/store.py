"""Durable task state: submission, reads, cancellation, events, and the work queue.

The ``tasks`` table is the queue. A worker claims the oldest queued task with one conditional
``UPDATE`` (on PostgreSQL its inner ``SELECT`` takes ``FOR UPDATE SKIP LOCKED``, so several
processes never claim the same row; on SQLite the write lock serializes claims), keeps a
heartbeat while it runs, and a task whose heartbeat stops (a crash, a SIGKILL) is requeued once,
then failed with a clear reason — never left running forever.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, case, func, insert, select, update
from sqlalchemy.orm import Session

from app.access.principal import Principal
from app.budgets import store as budgets_store
from app.budgets.override_signal import announce_after_commit
from app.core.errors import Conflict, NotFound
from app.core.money import usd_to_pico
from app.models import TERMINAL_TASK_STATUSES, BudgetScope, LLMUsage, Task, TaskEvent
from app.schemas.tasks import TaskSubmitRequest
from app.tasks import metrics_writer as task_metrics_writer

MAX_RUNS = 2  # one restart after a crash, then the task fails


def new_task_id() -> str:
    """128 random bits, URL-safe: task ids are not guessable."""
    return "tsk_" + secrets.token_hex(14)


def now() -> datetime:
    return datetime.now(UTC)


def create_task(
    session: Session, principal: Principal, request: TaskSubmitRequest, model: str
) -> Task:
    task = Task(
        id=new_task_id(),
        user_id=principal.user_id,
        repo_url=request.repo_url,
        ref=request.ref,
        bug_description=request.bug_description,
        test_command=request.test_command,
        model=model,
        max_cost_pico_usd=usd_to_pico(request.max_cost_usd) if request.max_cost_usd else None,
        max_attempts=request.max_attempts,
        status="queued",
        step="queued",
        created_at=now(),
    )
    session.add(task)
    session.flush()
    if task.max_cost_pico_usd is not None:
        # The task's cap is a task-scope budget: every agent call reserves against it first.
        announce_after_commit(session)
        budgets_store.upsert_override(
            session.connection(),
            BudgetScope.TASK,
            task.id,
            limit_pico=task.max_cost_pico_usd,
            soft_threshold=None,
            updated_by=principal.user_id,
            now=task.created_at,
        )
    add_event(session, task.id, "status", "queued")
    return task


def get_visible_task(session: Session, principal: Principal, task_id: str) -> Task:
    """The task if the principal may see it; another user's task is indistinguishable from none."""
    task = session.get(Task, task_id)
    if task is None or (not principal.is_admin and task.user_id != principal.user_id):
        raise NotFound(f"Task {task_id} not found")
    return task


def list_tasks(
    session: Session, principal: Principal, status: str | None, limit: int, offset: int
) -> tuple[Sequence[Task], int]:
    conditions: list[Any] = []
    if not principal.is_admin:
        conditions.append(Task.user_id == principal.user_id)
    if status is not None:
        conditions.append(Task.status == status)
    total = session.scalar(select(func.count()).select_from(Task).where(*conditions)) or 0
    rows = session.scalars(
        select(Task)
        .where(*conditions)
        .order_by(Task.created_at.desc(), Task.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return rows, int(total)


def task_spend(session: Session, task_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(cost in picodollars, LLM calls that reached the provider) per task, from the ledger."""
    if not task_ids:
        return {}
    reached_provider = case((LLMUsage.status == "blocked", 0), else_=1)
    rows = session.execute(
        select(
            LLMUsage.task_id,
            func.coalesce(func.sum(LLMUsage.cost_pico_usd), 0),
            func.coalesce(func.sum(reached_provider), 0),
        )
        .where(LLMUsage.task_id.in_(task_ids))
        .group_by(LLMUsage.task_id)
    ).all()
    return {str(r[0]): (int(r[1]), int(r[2])) for r in rows}


def request_cancel(session: Session, task: Task) -> Task:
    """A queued task is cancelled at once; a running one stops at its next step."""
    if task.status in TERMINAL_TASK_STATUSES:
        raise Conflict(f"Task {task.id} has already finished ({task.status})", status=task.status)
    if task.status == "queued":
        claimed = session.execute(
            update(Task)
            .where(Task.id == task.id, Task.status == "queued")
            .values(
                status="cancelled",
                step="cancelled",
                finished_at=now(),
                failure_reason="Cancelled before it started",
            )
            .returning(Task.id)
        ).first()
        if claimed:
            add_event(session, task.id, "status", "cancelled")
            session.refresh(task)
            return task
    session.execute(update(Task).where(Task.id == task.id).values(cancel_requested=True))
    add_event(session, task.id, "cancel", "cancellation requested")
    session.refresh(task)
    return task


def add_event(session: Session, task_id: str, kind: str, message: str) -> None:
    session.add(TaskEvent(task_id=task_id, kind=kind, message=message[:4000], timestamp=now()))


def events_after(
    session: Session, task_id: str, after_id: int, limit: int = 200
) -> Sequence[TaskEvent]:
    return session.scalars(
        select(TaskEvent)
        .where(TaskEvent.task_id == task_id, TaskEvent.id > after_id)
        .order_by(TaskEvent.id)
        .limit(limit)
    ).all()


def dump_outcome(outcome: Any) -> str | None:
    return None if outcome is None else json.dumps(asdict(outcome))


# -- the queue -------------------------------------------------------------------------------


def claim_next(engine: Engine, worker_id: str) -> str | None:
    """Atomically move the oldest queued task to running for ``worker_id``; its id or None."""
    with engine.begin() as conn:
        oldest = (
            select(Task.id)
            .where(Task.status == "queued")
            .order_by(Task.created_at, Task.id)
            .limit(1)
        )
        if conn.dialect.name == "postgresql":
            oldest = oldest.with_for_update(skip_locked=True)
        stamp = now()
        row = conn.execute(
            update(Task)
            .where(Task.id == oldest.scalar_subquery(), Task.status == "queued")
            .values(
                status="running",
                step="starting",
                worker_id=worker_id,
                heartbeat_at=stamp,
                started_at=func.coalesce(Task.started_at, stamp),
                runs=Task.runs + 1,
            )
            .returning(Task.id)
        ).first()
        if row is None:
            return None
        task_id = str(row[0])
        conn.execute(
            insert(TaskEvent).values(
                task_id=task_id, kind="status", message="running", timestamp=stamp
            )
        )
        return task_id


def heartbeat(engine: Engine, task_id: str, worker_id: str) -> bool:
    """Refresh the lease; False if the task is no longer ours (then stop working on it)."""
    with engine.begin() as conn:
        return bool(
            conn.execute(
                update(Task)
                .where(Task.id == task_id, Task.worker_id == worker_id, Task.status == "running")
                .values(heartbeat_at=now())
            ).rowcount
        )


def recover_stale(engine: Engine, lease_seconds: float) -> list[str]:
    """Requeue (once) or fail tasks whose worker stopped heartbeating; the ids touched."""
    cutoff = now() - timedelta(seconds=lease_seconds)
    touched: list[str] = []
    with engine.begin() as conn:
        stale = conn.execute(
            select(Task.id, Task.runs).where(Task.status == "running", Task.heartbeat_at < cutoff)
        ).all()
        for task_id, runs in stale:
            if runs < MAX_RUNS:
                values: dict[str, Any] = {
                    "status": "queued",
                    "step": "requeued after interruption",
                    "worker_id": None,
                }
                message = "requeued: its worker stopped (crash or restart)"
            else:
                values = {
                    "status": "error",
                    "step": "interrupted",
                    "finished_at": now(),
                    "failure_reason": (
                        "Interrupted twice by a crash or restart of its worker; not retried again."
                    ),
                }
                message = "error: interrupted again"
            changed = conn.execute(
                update(Task)
                .where(Task.id == task_id, Task.status == "running", Task.heartbeat_at < cutoff)
                .values(**values)
            ).rowcount
            if changed:
                conn.execute(
                    insert(TaskEvent).values(
                        task_id=task_id, kind="status", message=message, timestamp=now()
                    )
                )
                touched.append(str(task_id))
    return touched


def write_task_metrics(
    session: Session, task_id: str, metrics: dict[str, Any], finished_at: datetime | None = None
) -> None:
    """Record a finished task's metrics (``None`` values are skipped) and add them to the daily
    task rollup, in the session's transaction; a metric already recorded for the task is kept."""
    values = {name: Decimal(str(value)) for name, value in metrics.items() if value is not None}
    task_metrics_writer.record_task_metrics(
        session.connection(), task_id, values, finished_at or now()
    )
