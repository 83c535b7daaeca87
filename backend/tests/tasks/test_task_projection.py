"""A running task's projected final cost in ``GET /api/v1/task/{id}``, from finished tasks like
it and from its own progress (real app over ASGI, SQLite and PostgreSQL)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Engine, insert
from sqlalchemy.orm import Session

from app.core.money import PICO_PER_USD
from app.models import Task
from app.tasks import store as task_store
from app.tracking.record import UsageRecord
from app.tracking.writer import insert_usage
from tests.support.asgi_app import act_as, asgi_client, seeded_app

REPO = "https://example.com/r1.git"
EARLIER = datetime.now(UTC) - timedelta(days=2)


def add_task(
    engine: Engine, status: str, *, model: str = "m", repo: str = REPO, **extra: Any
) -> str:
    task_id = uuid.uuid4().hex
    values = {
        "id": task_id,
        "user_id": "bob",
        "repo_url": repo,
        "bug_description": "bug",
        "test_command": "pytest",
        "model": model,
        "status": status,
        "step": status,
        "attempts": 1,
        "max_attempts": 3,
        "created_at": EARLIER,
        **extra,
    }
    with engine.begin() as conn:
        conn.execute(insert(Task), [values])
    return task_id


def finished(engine: Engine, cost: str, **extra: Any) -> None:
    task_id = add_task(engine, "succeeded", finished_at=EARLIER, **extra)
    with Session(engine) as session, session.begin():
        task_store.write_task_metrics(session, task_id, {"cost_usd": Decimal(cost)}, EARLIER)


def spend(engine: Engine, task_id: str, usd: str) -> None:
    with engine.begin() as conn:
        insert_usage(
            conn,
            UsageRecord(
                request_id=uuid.uuid4().hex,
                model="m",
                status="success",
                task_id=task_id,
                user_id="bob",
                cost_pico_usd=int(Decimal(usd) * PICO_PER_USD),
            ),
        )


def _seed(engine: Engine) -> None:
    for tenth in range(1, 11):  # ten finished tasks like it: $0.10 ... $1.00
        finished(engine, f"{tenth / 10:.1f}")
    for _ in range(5):  # unlike it: another repository with another model
        finished(engine, "50", model="other", repo="https://example.com/r2.git")


@pytest.fixture
def app(database_url: str, tmp_path: Path) -> Iterator[FastAPI]:
    with seeded_app(database_url, tmp_path, seed=_seed) as application:
        act_as(application, "bob")
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(app) as c:
        yield c


async def _view(client: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/v1/task/{task_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_a_running_task_is_projected_from_similar_tasks_that_cost_at_least_as_much(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    engine = app.state.runtime.engine
    task_id = add_task(engine, "running")
    spend(engine, task_id, "0.35")
    body = await _view(client, task_id)
    # Of $0.10 ... $1.00, the seven at or above $0.35: median $0.70, 20th-80th pct $0.50-$0.90.
    assert body["cost_usd"] == "0.35"
    assert (body["projected_cost_basis"], body["projected_cost_samples"]) == ("similar_tasks", 7)
    assert body["projected_cost_usd"] == "0.7"
    assert (body["projected_cost_low_usd"], body["projected_cost_high_usd"]) == ("0.5", "0.9")


async def test_past_every_similar_task_the_projection_follows_its_own_attempts(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    engine = app.state.runtime.engine
    task_id = add_task(engine, "running")
    spend(engine, task_id, "0.85")
    body = await _view(client, task_id)
    # Two similar tasks cost more: too few. $0.85 for attempt 1 of 3: up to $2.55.
    assert (body["projected_cost_basis"], body["projected_cost_samples"]) == ("progress", 0)
    assert body["projected_cost_usd"] == "2.55" and body["projected_cost_low_usd"] == "0.85"

    capped = add_task(engine, "running", max_cost_pico_usd=PICO_PER_USD)  # a $1 cap
    spend(engine, capped, "0.85")
    assert (await _view(client, capped))["projected_cost_usd"] == "1"


async def test_finished_and_unknown_tasks_have_no_projection(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    engine = app.state.runtime.engine
    done = add_task(engine, "failed", finished_at=EARLIER)
    assert (await _view(client, done))["projected_cost_usd"] is None
    fresh = add_task(engine, "queued", model="never-seen", attempts=0)
    body = await _view(client, fresh)
    assert body["projected_cost_usd"] is None and body["projected_cost_basis"] is None


async def test_another_users_task_stays_invisible(app: FastAPI, client: httpx.AsyncClient) -> None:
    engine = app.state.runtime.engine
    theirs = add_task(engine, "running", user_id="alice")
    assert (await client.get(f"/api/v1/task/{theirs}")).status_code == 404
