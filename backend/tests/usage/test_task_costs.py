"""``metrics/tasks``: the cost per succeeded task and per phase (FixAgent, TestGenerator,
CodeAgent, and ``retries``: fix attempts after the first), exact, against sums done by hand."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app.api.v1.usage import utc_now
from app.core.money import usd_to_pico
from app.models import TaskEvent
from app.tasks import store as task_store
from app.tasks.metrics_writer import fix_attempt_step
from app.tracking.record import UsageRecord
from app.tracking.writer import insert_usage
from app.usage.task_metrics import SECOND_ATTEMPT_STARTED
from tests.support.asgi_app import act_as, seeded_app

NOW = datetime(2026, 3, 11, 12, 0, tzinfo=UTC)
T0 = NOW - timedelta(hours=3)  # the tasks' first fix attempt starts
T1 = NOW - timedelta(hours=2)  # "win"'s second one

# (task, agent, minutes after T0, USD): "win" retried (its calls from T1 on are retries), "lose"
# failed in one attempt, "tiny" succeeded for a picodollar-scale sum, "old" finished before
# the 7-day window.
CALLS = (
    ("win", "TestGenerator", -5, "0.1"),
    ("win", "FixAgent", 10, "0.2"),
    ("win", "CodeAgent", 20, "0.05"),
    ("win", "FixAgent", 70, "0.3"),
    ("win", "CodeAgent", 80, "0.07"),
    ("lose", "FixAgent", 15, "0.4"),
    ("tiny", "FixAgent", 5, "0.000000000003"),
    ("old", "FixAgent", -60 * 24 * 10, "5"),
)
OUTCOMES = {"win": 1, "lose": 0, "tiny": 1, "old": 1}


def _seed(engine: Engine) -> None:
    with engine.begin() as conn:
        for task, agent, minutes, usd in CALLS:
            insert_usage(
                conn,
                UsageRecord(
                    request_id=uuid.uuid4().hex,
                    model="m",
                    status="success",
                    task_id=task,
                    user_id="alice",
                    agent=agent,
                    cost_pico_usd=usd_to_pico(Decimal(usd)),
                    timestamp=T0 + timedelta(minutes=minutes),
                ),
            )
    with Session(engine) as session, session.begin():
        for task, attempt, at in (("win", 1, T0), ("win", 2, T1), ("lose", 1, T0)):
            message = fix_attempt_step(attempt)
            session.add(TaskEvent(task_id=task, kind="step", message=message, timestamp=at))
        for task, succeeded in OUTCOMES.items():
            cost = sum(Decimal(usd) for t, _, _, usd in CALLS if t == task)
            when = NOW - timedelta(days=9) if task == "old" else NOW - timedelta(minutes=30)
            metrics = {"succeeded": Decimal(succeeded), "cost_usd": cost}
            task_store.write_task_metrics(session, task, metrics, when)


@pytest.fixture
def costs_app(database_url: str, tmp_path: Path) -> Iterator[FastAPI]:
    with seeded_app(database_url, tmp_path, seed=_seed, now=NOW) as app:
        act_as(app, "root", "admin")
        app.dependency_overrides[utc_now] = lambda: NOW  # the usage reports' clock
        yield app


@pytest.fixture
async def costs_client(costs_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=costs_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://asa.test") as client:
        yield client


def test_the_second_attempt_marker_is_what_the_orchestrator_records() -> None:
    # The orchestrator and the report share ``fix_attempt_step``; the wording itself is pinned
    # because events stored before a change would keep the old one.
    assert SECOND_ATTEMPT_STARTED == fix_attempt_step(2) == "attempt 2: asking FixAgent for a fix"


async def test_cost_per_succeeded_task_and_per_phase_are_exact(
    costs_client: httpx.AsyncClient,
) -> None:
    body = (await costs_client.get("/api/v1/usage/metrics/tasks?days=7")).json()

    cost = body["cost"]
    assert (body["tasks"], body["succeeded"]) == (3, 2)
    assert cost["total_usd"] == "1.120000000003"  # 0.72 + 0.4 + 0.000000000003
    assert cost["succeeded_tasks_with_cost"] == 2
    assert cost["succeeded_total_usd"] == "0.720000000003"
    # 0.3600000000015 per task: half-even to the picodollar.
    assert cost["per_succeeded_task_usd"] == "0.360000000002"
    assert cost["by_phase"] == [
        {"phase": "CodeAgent", "tasks": 1, "total_usd": "0.12"},
        {"phase": "FixAgent", "tasks": 3, "total_usd": "0.900000000003"},
        {"phase": "TestGenerator", "tasks": 1, "total_usd": "0.1"},
        # "win"'s calls from its second attempt on: FixAgent's 0.3 and CodeAgent's 0.07.
        {"phase": "retries", "tasks": 1, "total_usd": "0.37"},
    ]
