"""The task queue: exactly-once claims under concurrency, and recovery from a dead worker."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from datetime import timedelta

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from app.access.principal import Principal
from app.core.db import create_db_engine
from app.models import Task, TaskEvent
from app.schemas.tasks import TaskSubmitRequest
from app.tasks import store as task_store

ALICE = Principal("alice", "user")


def queue(engine: Engine, count: int) -> list[str]:
    request = TaskSubmitRequest(repo_url="/tmp/x", bug_description="bug", test_command="pytest")
    with Session(engine) as session, session.begin():
        return [
            task_store.create_task(session, ALICE, request, "gpt-4o-mini").id for _ in range(count)
        ]


def drain(url: str, worker: str, out: list[str] | None = None) -> list[str]:
    engine = create_db_engine(url)
    claimed: list[str] = []
    while (task_id := task_store.claim_next(engine, worker)) is not None:
        claimed.append(task_id)
    engine.dispose()
    if out is not None:
        out.extend(claimed)
    return claimed


def _drain_into(url: str, worker: str, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    results.put(drain(url, worker))


def test_concurrent_workers_claim_each_task_exactly_once(database_url: str, engine: Engine) -> None:
    ids = queue(engine, 60)
    claimed: list[str] = []
    threads = [
        threading.Thread(target=drain, args=(database_url, f"w{i}", claimed)) for i in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert Counter(claimed) == Counter(ids)
    with Session(engine) as session:
        assert set(session.scalars(select(Task.status))) == {"running"}


def test_worker_processes_sharing_the_database_claim_each_task_exactly_once(
    database_url: str, engine: Engine
) -> None:
    ids = queue(engine, 40)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_drain_into, args=(database_url, f"p{i}", results)) for i in range(3)
    ]
    for proc in procs:
        proc.start()
    claimed = [task for _ in procs for task in results.get(timeout=120)]
    for proc in procs:
        proc.join(timeout=30)

    assert Counter(claimed) == Counter(ids)


def test_a_task_whose_worker_died_is_requeued_once_then_failed(engine: Engine) -> None:
    (task_id,) = queue(engine, 1)
    stale = task_store.now() - timedelta(minutes=10)

    for expected in ("queued", "error"):
        assert task_store.claim_next(engine, "dead-worker") == task_id
        with Session(engine) as session, session.begin():
            session.execute(update(Task).where(Task.id == task_id).values(heartbeat_at=stale))
        assert task_store.recover_stale(engine, lease_seconds=60) == [task_id]
        with Session(engine) as session:
            task = session.get(Task, task_id)
            assert task is not None and task.status == expected

    assert task is not None and "Interrupted" in (task.failure_reason or "")
    with Session(engine) as session:
        messages = session.scalars(
            select(TaskEvent.message).where(TaskEvent.task_id == task_id)
        ).all()
    assert any("requeued" in m for m in messages)


def test_a_live_heartbeat_keeps_the_task(engine: Engine) -> None:
    (task_id,) = queue(engine, 1)
    assert task_store.claim_next(engine, "w") == task_id
    assert task_store.heartbeat(engine, task_id, "w")
    assert not task_store.heartbeat(engine, task_id, "someone-else")
    assert task_store.recover_stale(engine, lease_seconds=60) == []
