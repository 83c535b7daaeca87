"""The recommendations' task figures from the outcome rollups (``app.usage.outcomes``) equal
the join of finished tasks to the usage rollups they replaced, exactly: for everyone and each
user, over several windows, with calls written after a task finished, a price recompute of old
rows, the fold of late tasks, and the migration that fills them."""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import BigInteger, Connection, Engine, cast, func, insert, select, update

from app.core.migrations import alembic_config, upgrade_to_head
from app.core.runtime import Runtime
from app.models import Task, TaskOutcome, UsageRollupDaily, UsageRollupTaskTotal
from app.notifications.dispatcher import NotificationDispatcher
from app.prices.recompute import RecomputeScope, recompute_prices
from app.tasks.store import MAX_RUNS, recover_stale
from app.tracking.pricing import PriceBook
from app.tracking.record import UsageRecord
from app.tracking.writer import insert_usage
from app.usage.outcomes import OUTCOME_STATUSES, RECENT, fold_late_outcomes, record_task_outcome
from app.usage.recommendations import (
    FAILED,
    SUCCEEDED,
    TaskOutcomes,
    read_agent_outcomes,
    read_model_outcomes,
    read_task_outcomes,
    window_bounds,
)
from tests.notifications.conftest import notify_settings
from tests.tasks.test_orchestrator import run_task
from tests.usage.test_recompute import LLAMA, tracked

USERS = ("alice", "bob", "carol")
# "*" was the all-repositories marker of the in-memory grouping: a task may name it.
REPOS = ("https://example.com/r1.git", "https://example.com/r2.git", "*")
TASK_MODELS = ("gpt-4o-mini", "my-llama")
STATUSES = (*OUTCOME_STATUSES, "cancelled")
MIN_TASKS = 4


# -- the oracle: the two joins the outcome rollups replaced (revision 0016's reads) ------------


def _task_filter(user_id: str | None, start: datetime, end: datetime) -> list[Any]:
    conditions = [
        Task.finished_at >= start,
        Task.finished_at < end,
        Task.status.in_((SUCCEEDED, *FAILED)),
    ]
    if user_id is not None:
        conditions.append(Task.user_id == user_id)
    return conditions


def oracle_task_outcomes(
    conn: Connection, user_id: str | None, start: datetime, end: datetime
) -> dict[tuple[str, str], TaskOutcomes]:
    r = UsageRollupTaskTotal
    query = (
        select(
            Task.repo_url,
            Task.model,
            Task.status,
            cast(func.count(Task.id), BigInteger),
            cast(func.coalesce(func.sum(r.cost_pico_usd), 0), BigInteger),
        )
        .select_from(Task)
        .outerjoin(r, r.task_id == Task.id)
        .where(*_task_filter(user_id, start, end))
        .group_by(Task.repo_url, Task.model, Task.status)
    )
    found: dict[tuple[str, str], TaskOutcomes] = defaultdict(TaskOutcomes)
    for repo, model, status, tasks, pico in conn.execute(query).all():
        found[(str(repo), str(model))].add(str(status), int(tasks), int(pico))
    return dict(found)


def oracle_agent_outcomes(
    conn: Connection, user_id: str | None, start: datetime, end: datetime
) -> dict[tuple[str, str], TaskOutcomes]:
    r = UsageRollupDaily
    query = (
        select(
            r.agent,
            r.model,
            Task.status,
            cast(func.count(func.distinct(Task.id)), BigInteger),
            cast(func.coalesce(func.sum(r.cost_pico_usd), 0), BigInteger),
        )
        .select_from(Task)
        .join(r, r.task_id == Task.id)
        .where(*_task_filter(user_id, start, end))
        .group_by(r.agent, r.model, Task.status)
    )
    found: dict[tuple[str, str], TaskOutcomes] = defaultdict(TaskOutcomes)
    for agent, model, status, tasks, pico in conn.execute(query).all():
        found[(str(agent) or "(none)", str(model))].add(str(status), int(tasks), int(pico))
    return dict(found)


def per_model(outcomes: dict[tuple[str, str], TaskOutcomes]) -> dict[str, TaskOutcomes]:
    models: dict[str, TaskOutcomes] = defaultdict(TaskOutcomes)
    for (_repo, model), result in outcomes.items():
        models[model].add(SUCCEEDED, result.succeeded, result.succeeded_pico)
        models[model].add("failed", result.failed, result.failed_pico)
    return dict(models)


def assert_reads_equal_the_oracle(engine: Engine, today: date | None = None) -> int:
    """Both reads equal the joins for everyone and each user over several windows; the number
    of non-empty comparisons (so a test can see it compared something)."""
    days_to = (
        [today]
        if today
        else [datetime.now(UTC).date(), datetime.now(UTC).date() - timedelta(days=9)]
    )
    compared = 0
    with engine.connect() as conn:
        for last in days_to:
            for days in (1, 7, 30, 60):
                _since, _until, start, end = window_bounds(last, days)
                for user in (None, *USERS):
                    where = f"{user or 'everyone'}, {days} days to {last}"
                    want = oracle_task_outcomes(conn, user, start, end)
                    assert read_task_outcomes(conn, user, start, end) == want, where
                    agents = oracle_agent_outcomes(conn, user, start, end)
                    assert read_agent_outcomes(conn, user, start, end) == agents, where
                    # What the recommendations read: the pairs that can be compared, and
                    # every pair summed per model.
                    pairs = {k: v for k, v in want.items() if v.tasks >= MIN_TASKS}
                    assert read_task_outcomes(conn, user, start, end, MIN_TASKS) == pairs, where
                    assert read_model_outcomes(conn, user, start, end) == per_model(want), where
                    compared += bool(want) + bool(agents)
    return compared


# -- a ledger of tasks and calls, written as the application writes them ------------------------


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def add_tasks(engine: Engine, count: int, rng: random.Random) -> list[str]:
    """``count`` running tasks of random users, repositories and models."""
    ids = [uuid.uuid4().hex for _ in range(count)]
    created = _now() - timedelta(days=50)
    rows = [
        {
            "id": task_id,
            "user_id": rng.choice(USERS),
            "repo_url": rng.choice(REPOS),
            "bug_description": "bug",
            "test_command": "pytest",
            "model": rng.choice(TASK_MODELS),
            "status": "running",
            "step": "running",
            "created_at": created,
        }
        for task_id in ids
    ]
    with engine.begin() as conn:
        conn.execute(insert(Task), rows)
    return ids


def write_calls(
    engine: Engine, task_ids: list[str | None], count: int, rng: random.Random, at: datetime
) -> list[UsageRecord]:
    """``count`` calls priced as the tracker does (``my-llama`` unpriced until a recompute),
    written through the usage writer's own insert, each in its own transaction."""
    book = PriceBook()
    records = []
    for _ in range(count):
        when = at - timedelta(seconds=rng.randint(0, 3 * 86400))
        record = tracked(book, rng, at=when, tasks=tuple(task_ids))
        records.append(record)
        with engine.begin() as conn:
            insert_usage(conn, record)
    return records


def finish(engine: Engine, task_id: str, status: str, at: datetime) -> None:
    """What the orchestrator's finish does to the task and its outcome, in one transaction."""
    with engine.begin() as conn:
        done = conn.execute(
            update(Task)
            .where(Task.id == task_id, Task.status == "running")
            .values(status=status, step=status, finished_at=at)
        ).rowcount
        if done and status in OUTCOME_STATUSES:
            record_task_outcome(conn, task_id)


def late_tasks(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        t = UsageRollupTaskTotal
        return set(conn.execute(select(t.task_id).where(t.late)).scalars())


def finish_at_random(
    engine: Engine, task_ids: list[str], rng: random.Random, recent: int = 0
) -> None:
    """Finish ``task_ids`` over the last 45 days (more than ``RECENT`` ago, so only the late
    flag can correct them), the last ``recent`` of them a minute ago."""
    for n, task_id in enumerate(task_ids):
        ago = (
            timedelta(minutes=1)
            if n >= len(task_ids) - recent
            else timedelta(seconds=rng.randint(int(RECENT.total_seconds()) * 2, 45 * 86400))
        )
        finish(engine, task_id, rng.choice(STATUSES), _now() - ago)


# -- the tests -------------------------------------------------------------------------------------


def test_the_reads_equal_the_join_through_late_calls_a_recompute_and_the_fold(
    engine: Engine,
) -> None:
    rng = random.Random(17)
    ids = add_tasks(engine, 40, rng)
    write_calls(engine, [*ids, None], 250, rng, _now())
    finish_at_random(engine, ids[:30], rng, recent=2)
    assert late_tasks(engine) == set()
    assert assert_reads_equal_the_oracle(engine) > 20

    # Late: calls of finished tasks (a spool replay, a gateway call), and of tasks that had
    # none when they finished; then the others finish.
    callless = add_tasks(engine, 3, rng)
    finish_at_random(engine, callless, rng)
    write_calls(engine, [*ids[:30], *callless], 60, rng, _now())
    assert late_tasks(engine)
    assert assert_reads_equal_the_oracle(engine)
    finish_at_random(engine, ids[30:], rng)
    assert_reads_equal_the_oracle(engine)

    # A price recompute changes old rows' cost (my-llama was unpriced): the rollups move
    # through the writer's door, and the tasks it reached are late.
    late_before = late_tasks(engine)
    run = recompute_prices(
        engine,
        PriceBook({"my-llama": LLAMA}),
        RecomputeScope(until=_now() + timedelta(seconds=1)),
        actor="ops",
    )
    assert run
    assert late_tasks(engine) > late_before
    assert_reads_equal_the_oracle(engine)

    late = late_tasks(engine)
    assert fold_late_outcomes(engine, batch=7) == len(late) > 7  # several transactions
    assert late_tasks(engine) == set()
    assert_reads_equal_the_oracle(engine)

    # After the fold: a late call flags its task again, and the fold is idempotent.
    write_calls(engine, ids[:5], 10, rng, _now())
    assert late_tasks(engine)
    assert_reads_equal_the_oracle(engine)
    fold_late_outcomes(engine)
    assert fold_late_outcomes(engine) == 0
    assert_reads_equal_the_oracle(engine)


def test_a_call_after_the_finish_flags_the_task_and_is_counted(engine: Engine) -> None:
    rng = random.Random(3)
    [task_id, callless] = add_tasks(engine, 2, rng)
    write_calls(engine, [task_id], 5, rng, _now() - timedelta(hours=2))
    finish(engine, task_id, "succeeded", _now() - timedelta(hours=1))
    finish(engine, callless, "failed", _now() - timedelta(hours=1))
    assert_reads_equal_the_oracle(engine)

    # Written an hour after the finish (older than RECENT): only the late flag tells.
    write_calls(engine, [task_id, callless], 6, rng, _now() - timedelta(hours=1))

    assert late_tasks(engine) == {task_id, callless}
    assert_reads_equal_the_oracle(engine)
    fold_late_outcomes(engine)
    assert late_tasks(engine) == set()
    assert_reads_equal_the_oracle(engine)


def test_a_call_that_raced_with_the_finish_is_counted_while_the_task_is_recent(
    engine: Engine,
) -> None:
    """On PostgreSQL a call whose statement started before the finish committed is not
    flagged late; while the task finished less than ``RECENT`` ago the reads re-read it."""
    rng = random.Random(8)
    [task_id] = add_tasks(engine, 1, rng)
    write_calls(engine, [task_id], 3, rng, _now() - timedelta(hours=1))
    finish(engine, task_id, "succeeded", _now() - timedelta(minutes=1))
    write_calls(engine, [task_id], 3, rng, _now() - timedelta(hours=1))
    with engine.begin() as conn:  # as if the call's statement had not seen the outcome
        conn.execute(update(UsageRollupTaskTotal).values(late=False))

    assert assert_reads_equal_the_oracle(engine)


def test_the_dispatchers_insights_scan_folds_the_late_tasks(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    rng = random.Random(9)
    ids = add_tasks(engine, 3, rng)
    finish_at_random(engine, ids, rng)
    write_calls(engine, ids, 6, rng, _now())
    assert late_tasks(engine)
    dispatcher = NotificationDispatcher(engine, notify_settings(database_url, tmp_path))
    try:
        dispatcher.run_once()  # the first round scans
    finally:
        dispatcher.stop(timeout=10)

    assert late_tasks(engine) == set()
    assert_reads_equal_the_oracle(engine)


def test_recording_an_outcome_twice_counts_it_once(engine: Engine) -> None:
    rng = random.Random(4)
    [task_id] = add_tasks(engine, 1, rng)
    write_calls(engine, [task_id], 4, rng, _now() - timedelta(hours=2))
    finish(engine, task_id, "error", _now() - timedelta(hours=1))
    with engine.begin() as conn:
        assert not record_task_outcome(conn, task_id)
    assert_reads_equal_the_oracle(engine)


def test_a_cancelled_or_unfinished_task_has_no_outcome(engine: Engine) -> None:
    rng = random.Random(5)
    cancelled, running = add_tasks(engine, 2, rng)
    write_calls(engine, [cancelled, running], 6, rng, _now() - timedelta(hours=2))
    finish(engine, cancelled, "cancelled", _now() - timedelta(hours=1))
    with engine.begin() as conn:
        assert not record_task_outcome(conn, running)
        assert not record_task_outcome(conn, cancelled)
        assert conn.execute(select(func.count()).select_from(TaskOutcome)).scalar_one() == 0
    assert_reads_equal_the_oracle(engine)


def test_the_reaper_records_the_outcome_of_a_task_it_fails(engine: Engine) -> None:
    rng = random.Random(6)
    [task_id] = add_tasks(engine, 1, rng)
    write_calls(engine, [task_id], 5, rng, _now() - timedelta(hours=1))
    with engine.begin() as conn:
        conn.execute(
            update(Task)
            .where(Task.id == task_id)
            .values(runs=MAX_RUNS, heartbeat_at=_now() - timedelta(hours=1))
        )

    assert recover_stale(engine, lease_seconds=60) == [task_id]

    with engine.connect() as conn:
        outcome = conn.execute(select(TaskOutcome).where(TaskOutcome.task_id == task_id)).one()
    assert outcome.status == "error"
    assert outcome.cost_pico_usd > 0
    assert_reads_equal_the_oracle(engine)


def test_the_orchestrator_records_the_outcome_with_the_finish(
    runtime: Runtime, tmp_path: Path
) -> None:
    empty = tmp_path / "not-a-repo"
    empty.mkdir()
    (empty / ".git").mkdir()  # git cannot clone it: the task fails at once

    task = run_task(runtime, empty)

    assert task.status == "failed"
    with runtime.engine.connect() as conn:
        outcome = conn.execute(select(TaskOutcome).where(TaskOutcome.task_id == task.id)).one()
    assert (outcome.status, outcome.user_id, outcome.model) == ("failed", "bob", task.model)
    assert assert_reads_equal_the_oracle(runtime.engine)


def test_a_window_not_of_whole_days_is_refused(engine: Engine) -> None:
    start = datetime(2026, 5, 1, 12, tzinfo=UTC)
    with engine.connect() as conn, pytest.raises(ValueError, match="whole UTC days"):
        read_task_outcomes(conn, None, start, start + timedelta(days=1))


# -- the migration -------------------------------------------------------------------------------


@pytest.fixture
def at_0016(engine: Engine, database_url: str) -> Iterator[list[str]]:
    """Calls written at head, then the database taken back to 0016 and tasks finished there
    (as the orchestrator did before the snapshot existed)."""
    rng = random.Random(16)
    ids = add_tasks(engine, 60, rng)
    write_calls(engine, [*ids, None], 300, rng, _now())
    command.downgrade(alembic_config(database_url), "0016")
    with engine.begin() as conn:
        for task_id in ids[:50]:
            ago = timedelta(seconds=rng.randint(3600, 45 * 86400))
            status = rng.choice(STATUSES)
            conn.execute(
                update(Task)
                .where(Task.id == task_id)
                .values(status=status, step=status, finished_at=_now() - ago)
            )
    yield ids
    upgrade_to_head(database_url)  # for the next test, even if this one failed half-way


def test_the_migration_fills_what_the_finishes_would_have(
    engine: Engine, database_url: str, at_0016: list[str]
) -> None:
    upgrade_to_head(database_url)

    assert late_tasks(engine) == set()
    assert assert_reads_equal_the_oracle(engine) > 20
    # And from there on, the snapshot and the late flag take over.
    rng = random.Random(18)
    write_calls(engine, at_0016[:10], 20, rng, _now())
    finish_at_random(engine, at_0016[50:], rng)
    assert_reads_equal_the_oracle(engine)
