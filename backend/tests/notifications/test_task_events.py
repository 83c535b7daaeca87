"""A task's end reaches the outbox in the transaction of its final status."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.access.principal import Principal
from app.core.runtime import Runtime
from app.models import NotificationEvent, Task
from app.schemas.tasks import TaskSubmitRequest
from app.tasks import store as task_store
from app.tasks.orchestrator import Orchestrator


def test_a_failed_task_records_task_failed_with_its_reason(
    runtime: Runtime, tmp_path: Path
) -> None:
    empty = tmp_path / "not-a-repo"
    empty.mkdir()
    (empty / ".git").mkdir()  # looks like a repository, but git cannot clone it
    request = TaskSubmitRequest(
        repo_url=str(empty), bug_description="a bug", test_command="python -m pytest -q"
    )
    with Session(runtime.engine) as session, session.begin():
        task_id = task_store.create_task(
            session, Principal("erin", "user"), request, "gpt-4o-mini"
        ).id
    assert task_store.claim_next(runtime.engine, "test") == task_id

    Orchestrator(runtime, task_id, worker_id="test").run()

    with Session(runtime.engine) as session:
        task = session.get(Task, task_id)
        (event,) = session.scalars(select(NotificationEvent)).all()
    assert task is not None and task.status in ("failed", "error")
    assert (event.id, event.kind, event.subject_user_id) == (
        f"task.finished:{task_id}",
        "task.failed",
        "erin",
    )
    data = json.loads(event.payload)["data"]
    assert data["status"] == task.status and data["reason"] == task.failure_reason
