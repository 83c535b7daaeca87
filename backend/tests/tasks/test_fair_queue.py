"""Fair sharing of the queue: users take turns, a user's running and queued tasks are capped,
on SQLite and PostgreSQL, one claimer at a time and many at once."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from app.access.principal import Principal
from app.core.config import Settings
from app.core.db import create_db_engine
from app.core.errors import QueueFull
from app.models import Task
from app.schemas.tasks import TaskSubmitRequest
from app.tasks import store as task_store

REQUEST = TaskSubmitRequest(repo_url="/tmp/x", bug_description="bug", test_command="pytest")


def submit(engine: Engine, user: str, count: int = 1, max_queued: int | None = None) -> list[str]:
    ids = []
    for _ in range(count):
        with Session(engine) as session, session.begin():
            task = task_store.create_task(
                session,
                Principal(user, "user"),
                REQUEST,
                "gpt-4o-mini",
                max_queued_per_user=max_queued,
            )
            ids.append(task.id)
    return ids


def owner(engine: Engine, task_id: str | None) -> str | None:
    if task_id is None:
        return None
    with Session(engine) as session:
        task = session.get(Task, task_id)
        return None if task is None else task.user_id


def finish(engine: Engine, task_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(update(Task).where(Task.id == task_id).values(status="succeeded"))


def running_by_user(engine: Engine) -> Counter[str]:
    with Session(engine) as session:
        rows = session.execute(
            select(Task.user_id, func.count())
            .where(Task.status == "running")
            .group_by(Task.user_id)
        ).all()
    return Counter({user: int(count) for user, count in rows})


def test_another_users_task_is_claimed_second_not_eleventh(engine: Engine) -> None:
    alice = submit(engine, "alice", 10)
    (bob,) = submit(engine, "bob")

    claimed = [task_store.claim_next(engine, "w") for _ in range(11)]

    assert claimed[0] == alice[0]
    assert claimed[1] == bob
    assert claimed[2:] == alice[1:]  # then alice's, oldest first
    assert task_store.claim_next(engine, "w") is None


def test_one_worker_serves_users_in_turn(engine: Engine) -> None:
    alice = submit(engine, "alice", 3)
    bob = submit(engine, "bob", 2)
    carol = submit(engine, "carol", 1)

    order = []
    while (task_id := task_store.claim_next(engine, "w", max_running_per_user=1)) is not None:
        order.append(task_id)
        finish(engine, task_id)  # one worker: each task ends before the next is claimed

    assert order == [alice[0], bob[0], carol[0], alice[1], bob[1], alice[2]]


def test_a_long_queue_does_not_make_a_user_look_never_served(engine: Engine) -> None:
    alice = submit(engine, "alice", 72)  # more queued tasks than the recent ones looked at
    bob = submit(engine, "bob", 2)

    order = []
    for _ in range(4):
        task_id = task_store.claim_next(engine, "w", max_running_per_user=1)
        assert task_id is not None
        order.append(task_id)
        finish(engine, task_id)

    assert order == [alice[0], bob[0], alice[1], bob[1]]


def test_a_user_at_the_running_cap_gets_no_other_task(engine: Engine) -> None:
    alice = submit(engine, "alice", 3)

    first = task_store.claim_next(engine, "w", max_running_per_user=1)
    second = task_store.claim_next(engine, "w", max_running_per_user=1)
    (bob,) = submit(engine, "bob")
    third = task_store.claim_next(engine, "w", max_running_per_user=1)
    fourth = task_store.claim_next(engine, "w", max_running_per_user=1)
    finish(engine, alice[0])
    fifth = task_store.claim_next(engine, "w", max_running_per_user=1)

    assert (first, second, third, fourth, fifth) == (alice[0], None, bob, None, alice[1])


def test_the_running_cap_counts_each_users_own_tasks(engine: Engine) -> None:
    submit(engine, "alice", 5)
    submit(engine, "bob", 5)

    claimed = [task_store.claim_next(engine, "w", max_running_per_user=2) for _ in range(5)]

    assert claimed[4] is None
    assert running_by_user(engine) == Counter({"alice": 2, "bob": 2})
    assert [owner(engine, t) for t in claimed[:4]] == ["alice", "bob", "alice", "bob"]


def test_concurrent_workers_never_pass_a_users_running_cap(
    database_url: str, engine: Engine
) -> None:
    for user in ("alice", "bob", "carol"):
        submit(engine, user, 6)
    claimed: list[str | None] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker(name: str) -> None:
        own = create_db_engine(database_url)
        start.wait(timeout=30)
        for _ in range(3):
            task_id = task_store.claim_next(own, name, max_running_per_user=2)
            with lock:
                claimed.append(task_id)
        own.dispose()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    taken = [t for t in claimed if t is not None]
    assert len(taken) == len(set(taken)) == 6  # every claim exactly once, and no more than the caps
    assert running_by_user(engine) == Counter({"alice": 2, "bob": 2, "carol": 2})


def test_a_submission_beyond_the_queued_cap_is_refused(engine: Engine) -> None:
    submit(engine, "alice", 3, max_queued=3)

    with pytest.raises(QueueFull, match="3 tasks waiting"):
        submit(engine, "alice", max_queued=3)
    submit(engine, "bob", max_queued=3)  # another user's queue is their own
    task_store.claim_next(engine, "w")  # one of alice's starts: room for one more
    submit(engine, "alice", max_queued=3)

    with Session(engine) as session:
        queued = session.scalar(
            select(func.count()).where(Task.user_id == "alice", Task.status == "queued")
        )
    assert queued == 3


def test_concurrent_submissions_never_pass_the_queued_cap(
    database_url: str, engine: Engine
) -> None:
    outcomes: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(10)

    def submitter() -> None:
        own = create_db_engine(database_url)
        start.wait(timeout=30)
        try:
            submit(own, "alice", max_queued=4)
            outcome = "queued"
        except QueueFull:
            outcome = "refused"
        with lock:
            outcomes.append(outcome)
        own.dispose()

    threads = [threading.Thread(target=submitter) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert Counter(outcomes) == Counter({"queued": 4, "refused": 6})


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [({}, 1), ({"max_concurrent_tasks": 8}, 4), ({"task_max_running_per_user": 3}, 3)],
)
def test_the_running_cap_defaults_to_half_the_workers(
    overrides: dict[str, Any], expected: int
) -> None:
    settings = Settings.model_validate({"_env_file": None, **overrides})
    assert settings.max_running_tasks_per_user == expected
