"""Durable task state: submission, reads, cancellation, events, and the work queue.

The ``tasks`` table is the queue. A worker claims the next task with one conditional ``UPDATE``
(on PostgreSQL its inner ``SELECT`` takes ``FOR UPDATE SKIP LOCKED``, so several processes never
claim the same row; on SQLite the write lock serializes claims), keeps a heartbeat while it runs,
and a task whose heartbeat stops (a crash, a SIGKILL) is requeued once, then failed with a clear
reason — never left running forever. Users take turns: the next task is the oldest queued one of
the user with the fewest tasks running (then the one served least recently), never one of a
user at their cap of running tasks; a user's queued tasks are capped at submission.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, Select, case, func, insert, select, update
from sqlalchemy.orm import Session, aliased

from app.access.principal import LOCAL_USER, Principal
from app.budgets import store as budgets_store
from app.budgets.override_signal import announce_after_commit
from app.core.errors import Conflict, NotFound, QueueFull
from app.core.money import usd_to_pico
from app.models import TERMINAL_TASK_STATUSES, ApiKey, BudgetScope, LLMUsage, Task, TaskEvent
from app.schemas.tasks import TaskSubmitRequest
from app.tasks import metrics_writer as task_metrics_writer
from app.usage.outcomes import OUTCOME_STATUSES, record_task_outcome

MAX_RUNS = 2  # one restart after a crash, then the task fails
# How many of a user's newest started tasks say when the user was last served. A user's tasks
# start oldest first, so the one started last is among the newest; reading them is bounded (the
# index on (user_id, created_at), read backwards past the queued ones) however long the history.
_RECENT_TASKS = 64
# PostgreSQL advisory lock classes (the first key of pg_advisory_xact_lock(int, int)).
_CLAIM_LOCK = 0x41534101  # claims, one at a time
_QUEUE_LOCK = 0x41534102  # one user's submissions, one at a time


def new_task_id() -> str:
    """128 random bits, URL-safe: task ids are not guessable."""
    return "tsk_" + secrets.token_hex(14)


def now() -> datetime:
    return datetime.now(UTC)


def task_cost_cap(
    principal: Principal, requested_usd: Decimal | None, default_usd: Decimal | None
) -> tuple[Decimal | None, bool]:
    """The cost cap a new task gets, and whether it needs a task override of its own.

    ``default_usd`` is the cap that applies without one (``BUDGET_TASK_MAX_USD``; None:
    unlimited). A user's ``requested_usd`` can only lower it; an administrator's replaces it.
    """
    if requested_usd is None:
        return default_usd, False
    if principal.is_admin or default_usd is None or requested_usd < default_usd:
        return requested_usd, True
    return default_usd, False  # a user asking for more gets the cap that applies anyway


def create_task(
    session: Session,
    principal: Principal,
    request: TaskSubmitRequest,
    model: str,
    *,
    default_max_cost_usd: Decimal | None = None,
    max_queued_per_user: int | None = None,
) -> Task:
    """Queue a task for ``principal``, in the session's transaction.

    ``default_max_cost_usd`` is the environment's task cap (``BUDGET_TASK_MAX_USD``): the
    request's ``max_cost_usd`` lowers it (raises it only for an administrator). With
    ``max_queued_per_user``, a user who already has that many tasks queued gets ``QueueFull``.
    """
    cap, own_override = task_cost_cap(principal, request.max_cost_usd, default_max_cost_usd)
    task = Task(
        id=new_task_id(),
        user_id=principal.user_id,
        repo_url=request.repo_url,
        ref=request.ref,
        bug_description=request.bug_description,
        test_command=request.test_command,
        model=model,
        fallback_model=request.fallback_model,
        # The cap shown with the task: set when the request named one (lowered as above).
        max_cost_pico_usd=None if request.max_cost_usd is None or cap is None else usd_to_pico(cap),
        max_attempts=request.max_attempts,
        status="queued",
        step="queued",
        created_at=now(),
    )
    session.add(task)
    session.flush()  # the write first: on SQLite it takes the database's write lock
    if max_queued_per_user is not None:
        _ensure_queue_room(session, principal.user_id, max_queued_per_user)
    if own_override and task.max_cost_pico_usd is not None:
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


def _ensure_queue_room(session: Session, user_id: str, limit: int) -> None:
    """``QueueFull`` when the user's queued tasks, the one just added included, exceed ``limit``.

    Concurrent submissions of one user are counted one after the other: SQLite has one writer,
    and on PostgreSQL a transaction lock per user orders them (each count then sees the rows
    the previous submissions committed).
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(_QUEUE_LOCK, func.hashtext(user_id))))
    queued = session.scalar(
        select(func.count())
        .select_from(Task)
        .where(Task.user_id == user_id, Task.status == "queued")
    )
    if (queued or 0) > limit:
        raise QueueFull(
            f"You already have {limit} tasks waiting to run, the most one user may queue; "
            "submit more once some have started, or cancel some.",
            limit=limit,
        )


def submitted_by_admin(session: Session, task: Task) -> bool:
    """Whether the task's user is an administrator now: they hold a live admin key, or they are
    the open local mode's administrator (the local user, who has no key).

    What an administrator's task may do that another's may not (clone from a private address,
    read git's own error text) is decided when it runs, from this.
    """
    keys = session.execute(
        select(ApiKey.role, ApiKey.revoked_at).where(ApiKey.user_id == task.user_id)
    ).all()
    if not keys:
        return task.user_id == LOCAL_USER
    return any(role == "admin" and revoked_at is None for role, revoked_at in keys)


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


def _next_in_turn(max_running_per_user: int | None, *, lock: bool) -> Select[str]:
    """The queued task to run next: users take turns.

    Among users with a queued task and fewer than ``max_running_per_user`` running, the user
    with the fewest running tasks goes first, then the one served least recently (the latest
    start among their ``_RECENT_TASKS`` newest started tasks; never served goes first), and their
    oldest queued task is taken.
    """
    queued = aliased(Task, name="queued")
    other = aliased(Task, name="other")
    running = (
        select(func.count())
        .select_from(other)
        .where(other.user_id == queued.user_id, other.status == "running")
        .scalar_subquery()
    )
    recent = (
        select(other.started_at)
        .where(other.user_id == queued.user_id, other.started_at.is_not(None))
        .order_by(other.created_at.desc())
        .limit(_RECENT_TASKS)
        .correlate(queued)
        .subquery("recent")
    )
    last_served = select(func.max(recent.c.started_at)).scalar_subquery()
    pick = select(queued.id).where(queued.status == "queued")
    if max_running_per_user is not None:
        pick = pick.where(running < max_running_per_user)
    pick = pick.order_by(
        running, last_served.asc().nulls_first(), queued.created_at, queued.id
    ).limit(1)
    if lock:
        pick = pick.with_for_update(skip_locked=True, of=queued)
    return pick


def claim_next(
    engine: Engine, worker_id: str, *, max_running_per_user: int | None = None
) -> str | None:
    """Atomically move the next queued task (users take turns, see ``_next_in_turn``) to
    running for ``worker_id``; its id, or None when no task may start.

    With ``max_running_per_user``, a user with that many tasks running gets no other until
    one ends. On PostgreSQL claims take a transaction lock, one at a time, so that each counts
    the running tasks the previous claims committed; the picked row is also taken ``FOR UPDATE
    SKIP LOCKED`` (a row another transaction is changing, e.g. cancelling, is passed over).
    On SQLite the UPDATE holds the database's write lock from its start.
    """
    with engine.begin() as conn:
        postgres = conn.dialect.name == "postgresql"
        if postgres:
            conn.execute(select(func.pg_advisory_xact_lock(_CLAIM_LOCK, 0)))
        pick = _next_in_turn(max_running_per_user, lock=postgres)
        stamp = now()
        row = conn.execute(
            update(Task)
            .where(Task.id == pick.scalar_subquery(), Task.status == "queued")
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
                if values["status"] in OUTCOME_STATUSES:  # the recommendations' snapshot
                    record_task_outcome(conn, task_id)
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
