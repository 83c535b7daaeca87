"""The task API: submit a bug, follow it, read the verified patch and what it cost."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from app.api.auth import CurrentPrincipal
from app.api.deps import RuntimeDep, SessionDep, TaskId
from app.api.guards import limit_task_submissions
from app.core.errors import InvalidInput
from app.models import TERMINAL_TASK_STATUSES, Task
from app.sandbox.runner import InvalidTestCommand, parse_test_command
from app.sandbox.workspace import (
    InvalidGitRef,
    InvalidRepoURL,
    validate_git_ref,
    validate_repo_url,
)
from app.schemas.tasks import (
    TaskEventView,
    TaskPage,
    TaskStatus,
    TaskSubmitRequest,
    TaskSubmitted,
    TaskView,
)
from app.tasks import store as task_store
from app.tasks.projection import project_task_cost
from app.tasks.views import task_view

router = APIRouter(prefix="/api/v1/task", tags=["tasks"])
SSE_POLL_SECONDS = 0.5
SSE_MAX_SECONDS = 3600.0


@router.post(
    "/submit",
    status_code=202,
    response_model=TaskSubmitted,
    dependencies=[Depends(limit_task_submissions)],
)
def submit_task(
    body: TaskSubmitRequest,
    principal: CurrentPrincipal,
    session: SessionDep,
    runtime: RuntimeDep,
) -> TaskSubmitted:
    """Queue a task. The repository URL, ref and test command are checked before queueing.

    ``max_cost_usd`` lowers the task's cost cap; a user's higher value is lowered to the cap that
    applies (the answer's ``max_cost_usd`` says which). A user with TASK_MAX_QUEUED_PER_USER
    tasks waiting gets 429 ``queue_full``.
    """
    try:
        # A local path reads the server's disk, a private address reaches the server's network:
        # administrators (and the open local mode) only.
        validate_repo_url(
            body.repo_url,
            allow_local=principal.is_admin,
            allow_private_hosts=principal.is_admin,
        )
        if body.ref is not None:
            validate_git_ref(body.ref)
        parse_test_command(body.test_command)
    except (InvalidRepoURL, InvalidGitRef, InvalidTestCommand) as exc:
        field = {
            InvalidRepoURL: "repo_url",
            InvalidGitRef: "ref",
            InvalidTestCommand: "test_command",
        }[type(exc)]
        raise InvalidInput(str(exc), field=field) from exc
    settings = runtime.settings
    task = task_store.create_task(
        session,
        principal,
        body,
        body.model or settings.default_model,
        default_max_cost_usd=settings.budget_task_max_usd,
        max_queued_per_user=settings.task_max_queued_per_user,
    )
    worker = runtime.task_worker
    if worker is not None:
        session.info.setdefault("after_commit", []).append(worker.wake)
    status_url = _status_url(task)
    cap, _ = task_store.task_cost_cap(principal, body.max_cost_usd, settings.budget_task_max_usd)
    return TaskSubmitted(
        task_id=task.id,
        status="queued",
        status_url=status_url,
        events_url=status_url + "/events",
        max_cost_usd=cap,
    )


@router.get("", response_model=TaskPage)
def list_tasks(
    principal: CurrentPrincipal,
    session: SessionDep,
    status: TaskStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> TaskPage:
    """Your tasks (all tasks for an admin), newest first."""
    rows, total = task_store.list_tasks(session, principal, status, limit, offset)
    spend = task_store.task_spend(session, [t.id for t in rows])
    items = [task_view(t, spend.get(t.id, (0, 0)), _status_url(t)) for t in rows]
    return TaskPage(items=items, total=total, limit=limit, offset=offset)


@router.get("/{task_id}", response_model=TaskView)
def get_task(task_id: TaskId, principal: CurrentPrincipal, session: SessionDep) -> TaskView:
    """Status, current step, attempts, cost so far (and its projected final cost while the task
    runs), and at the end the result."""
    task = task_store.get_visible_task(session, principal, task_id)
    spend = task_store.task_spend(session, [task.id]).get(task.id, (0, 0))
    projection = project_task_cost(session, task, spend[0])
    return task_view(task, spend, _status_url(task), projection)


@router.post("/{task_id}/cancel", response_model=TaskView)
def cancel_task(
    task_id: TaskId,
    principal: CurrentPrincipal,
    session: SessionDep,
    runtime: RuntimeDep,
) -> TaskView:
    """Stop a queued task at once, or a running one at its next step."""
    task = task_store.get_visible_task(session, principal, task_id)
    task = task_store.request_cancel(session, task)
    worker = runtime.task_worker
    if worker is not None:
        session.info.setdefault("after_commit", []).append(worker.wake)
    spend = task_store.task_spend(session, [task.id]).get(task.id, (0, 0))
    return task_view(task, spend, _status_url(task))


@router.get(
    "/{task_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-sent events"}},
)
async def task_events(
    task_id: TaskId,
    principal: CurrentPrincipal,
    runtime: RuntimeDep,
    after: Annotated[int, Query(ge=0)] = 0,
) -> StreamingResponse:
    """Live progress as server-sent events (``curl -N``); ends when the task finishes."""

    def load(after_id: int) -> tuple[list[TaskEventView], str]:
        with runtime.session_factory() as session:
            task = task_store.get_visible_task(session, principal, task_id)
            events = task_store.events_after(session, task_id, after_id)
            return [
                TaskEventView.model_validate(e, from_attributes=True) for e in events
            ], task.status

    await anyio.to_thread.run_sync(load, after)  # 404 before the stream starts

    async def stream() -> AsyncIterator[str]:
        last = after
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SSE_MAX_SECONDS
        while loop.time() < deadline:
            events, status = await anyio.to_thread.run_sync(load, last)
            for event in events:
                last = event.id
                yield f"id: {event.id}\nevent: {event.kind}\ndata: {event.model_dump_json()}\n\n"
            if status in TERMINAL_TASK_STATUSES and not events:
                yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
                return
            if not events:
                yield ": keep-alive\n\n"
            await asyncio.sleep(SSE_POLL_SECONDS)

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


def _status_url(task: Task) -> str:
    return f"{router.prefix}/{task.id}"
