"""``POST /api/v1/admin/prices/recompute`` does not hold a request for a long run: the run goes
on in the background, its progress and outcome readable at its ``Location``; on SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
from sqlalchemy import Engine

from app.tracking.record import UsageRecord
from app.tracking.writer import insert_usage
from tests.usage.test_recompute_api import NOW, Service, ledger_cost, service

__all__ = ["service"]  # the fixture, shared with the API's other recompute tests

ROWS = 4000  # enough that the run cannot end in the moment before the answer


def unpriced_rows(engine: Engine, count: int) -> Decimal:
    """``count`` unpriced ``my-llama`` calls; their cost at the service's override, in USD."""
    records = [
        UsageRecord(
            request_id=uuid.uuid4().hex,
            model="my-llama",
            status="success",
            user_id="alice",
            task_id=f"t{n % 7}",
            provider="openai",
            prompt_tokens=1000 + n,
            completion_tokens=100,
            cost_status="unpriced",
            timestamp=NOW - timedelta(seconds=n),
        )
        for n in range(count)
    ]
    with engine.begin() as conn:
        for record in records:
            insert_usage(conn, record)
    return sum(
        (Decimal(r.prompt_tokens) * Decimal("0.20") + Decimal(r.completion_tokens) * Decimal("0.4"))
        / 1_000_000
        for r in records
    )


async def until_finished(admin: httpx.AsyncClient, location: str) -> list[dict[str, Any]]:
    """Every record read at ``location`` until the run is no longer running (60 s at most)."""
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = await admin.get(location)
        assert response.status_code == 200, response.text
        seen.append(response.json())
        if seen[-1]["status"] != "running":
            return seen
        await asyncio.sleep(0.05)
    raise AssertionError(f"the run is still running: {seen[-1]}")


async def test_a_run_that_outlasts_the_wait_is_answered_202_and_finishes_in_the_background(
    service: Service,
) -> None:
    engine = service.runtime.engine
    expected = unpriced_rows(engine, ROWS)
    async with service.client("admin", "root") as admin:
        started = await admin.post("/api/v1/admin/prices/recompute", json={"wait_seconds": 0})
        location = started.headers.get("location", "")
        seen = await until_finished(admin, location)
        listed = await admin.get("/api/v1/admin/prices/recompute")

    assert started.status_code == 202, started.text
    run = started.json()
    assert run["status"] == "running" and run["actor"] == "root"
    assert location == f"/api/v1/admin/prices/recompute/{run['id']}"
    final = seen[-1]
    assert (final["status"], final["error"]) == ("done", None)
    assert final["rows_examined"] == final["rows_changed"] == ROWS
    assert (final["unpriced_before"], final["unpriced_after"]) == (ROWS, 0)
    assert Decimal(final["cost_delta_usd"]) == expected
    assert ledger_cost(engine) == int(expected * 10**12)
    # Progress only grows while it runs, and the list shows the finished run.
    examined = [record["rows_examined"] for record in seen]
    assert examined == sorted(examined)
    assert listed.json()["items"][0] == final


async def test_a_dry_run_within_the_wait_is_answered_with_its_finished_record(
    service: Service,
) -> None:
    engine = service.runtime.engine
    expected = unpriced_rows(engine, 50)
    async with service.client("admin", "root") as admin:
        response = await admin.post(
            "/api/v1/admin/prices/recompute", json={"dry_run": True, "wait_seconds": 30}
        )

    assert response.status_code == 200, response.text
    assert "location" not in response.headers
    run = response.json()
    assert (run["status"], run["dry_run"], run["rows_changed"]) == ("done", True, 50)
    assert Decimal(run["cost_delta_usd"]) == expected
    assert ledger_cost(engine) == 0


async def test_a_user_may_not_read_a_runs_progress(service: Service) -> None:
    unpriced_rows(service.runtime.engine, 10)
    async with service.client("admin", "root") as admin:
        started = await admin.post("/api/v1/admin/prices/recompute", json={"wait_seconds": 0})
        await until_finished(admin, started.headers["location"])
    async with service.client("user", "mallory") as user:
        read = await user.get(started.headers["location"])
        post = await user.post("/api/v1/admin/prices/recompute", json={"wait_seconds": 0})

    assert (read.status_code, post.status_code) == (403, 403)
    assert "error" in read.json()


async def test_a_wait_beyond_a_minute_is_refused(service: Service) -> None:
    async with service.client("admin", "root") as admin:
        response = await admin.post("/api/v1/admin/prices/recompute", json={"wait_seconds": 61})
    assert response.status_code == 422
