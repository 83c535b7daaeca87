"""``GET /api/v1/usage/recommendations`` against ledgers built with known waste."""

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
from app.tracking.record import UsageRecord
from app.tracking.writer import insert_usage
from app.usage.insights import recommendations, refresh_recommendations
from app.usage.outcomes import backfill_task_outcomes
from app.usage.recommendations import TaskOutcomes, not_worse
from tests.support.asgi_app import act_as, asgi_client, seeded_app

NOW = datetime(2026, 3, 11, 12, 0, tzinfo=UTC)
YESTERDAY = NOW - timedelta(days=1)


class Ledger:
    """Calls written through the usage writer's own insert (the row and every rollup), and
    finished tasks."""

    def __init__(self) -> None:
        self.records: list[UsageRecord] = []
        self.tasks: list[dict[str, Any]] = []

    def call(
        self,
        user: str,
        model: str,
        usd: str,
        *,
        task: str = "",
        agent: str = "fix_agent",
        status: str = "success",
        finish_reason: str | None = "stop",
        attempts: int = 1,
        prompt: int = 1000,
        cached: int = 0,
        when: datetime = YESTERDAY,
    ) -> None:
        self.records.append(
            UsageRecord(
                request_id=uuid.uuid4().hex,
                model=model,
                status=status,
                task_id=task or None,
                user_id=user,
                agent=agent,
                prompt_tokens=prompt,
                cached_tokens=cached,
                cost_pico_usd=int(Decimal(usd) * PICO_PER_USD),
                finish_reason=finish_reason,
                attempts=attempts,
                timestamp=when,
            )
        )

    def task(
        self, user: str, repo: str, model: str, status: str, usd: str, *, agents: int = 2
    ) -> None:
        task_id = uuid.uuid4().hex
        self.tasks.append(
            {
                "id": task_id,
                "user_id": user,
                "repo_url": repo,
                "bug_description": "bug",
                "test_command": "pytest",
                "model": model,
                "status": status,
                "step": status,
                "created_at": YESTERDAY,
                "finished_at": YESTERDAY,
            }
        )
        share = Decimal(usd) / agents
        for agent in ("fix_agent", "code_agent")[:agents]:
            self.call(user, model, str(share), task=task_id, agent=agent)

    def write(self, engine: Engine) -> None:
        with engine.begin() as conn:
            for record in self.records:
                insert_usage(conn, record)
            if self.tasks:
                conn.execute(insert(Task), self.tasks)
                # Finished here, not by the orchestrator: their outcomes snapshot as it would.
                backfill_task_outcomes(conn)


def known_waste() -> Ledger:
    """alice's ledger: on repo r1, `big` fixed 20 of 25 tasks ($2 each, failures $1), `small`
    19 of 25 ($0.50, failures $0.25), `bad` 5 of 25 ($0.10, failures $0.10), `tiny` 3 of 3 (too
    few to compare). Outside tasks: 10 ordinary $1 calls, 2 failed calls of $0.50, 3 truncated
    of $1, one retried twice ($1), 10 blocked. bob has one task and one $7 call."""
    ledger = Ledger()
    r1 = "https://example.com/r1.git"
    for model, ok, ok_usd, ko, ko_usd in (
        ("big", 20, "2", 5, "1"),
        ("small", 19, "0.5", 6, "0.25"),
        ("bad", 5, "0.1", 20, "0.1"),
        ("tiny", 3, "0.01", 0, "0"),
    ):
        for _ in range(ok):
            ledger.task("alice", r1, model, "succeeded", ok_usd)
        for i in range(ko):
            ledger.task("alice", r1, model, ("failed", "error", "budget_exceeded")[i % 3], ko_usd)
    ledger.task("alice", r1, "big", "cancelled", "50")  # left out: its owner stopped it
    for _ in range(10):
        ledger.call("alice", "big", "1", prompt=20_000, cached=1_000)
    for _ in range(2):
        ledger.call("alice", "big", "0.5", status="error", finish_reason=None)
    for _ in range(3):
        ledger.call("alice", "small", "1", finish_reason="length", prompt=50_000, cached=40_000)
    ledger.call("alice", "small", "1", attempts=3)
    for _ in range(10):
        ledger.call("alice", "small", "0", status="blocked", finish_reason=None)
    ledger.call("alice", "big", "100", when=NOW - timedelta(days=40))  # outside 30 days
    ledger.task("bob", "https://example.com/r2.git", "big", "succeeded", "3")
    ledger.call("bob", "big", "7")
    return ledger


@pytest.fixture
def recommend_app(database_url: str, tmp_path: Path) -> Iterator[FastAPI]:
    with seeded_app(database_url, tmp_path, now=NOW) as app:
        yield app


@pytest.fixture
async def client(recommend_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(recommend_app) as c:
        yield c


async def _get(client: httpx.AsyncClient, query: str = "") -> dict[str, Any]:
    response = await client.get(f"/api/v1/usage/recommendations{query}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_the_waste_of_a_known_ledger_is_counted_to_the_cent(
    recommend_app: FastAPI, client: httpx.AsyncClient
) -> None:
    known_waste().write(recommend_app.state.runtime.engine)
    act_as(recommend_app, "alice")
    body = await _get(client)
    assert (body["scope"], body["user_id"], body["since"], body["until"]) == (
        "user", "alice", "2026-02-10", "2026-03-11"
    )  # fmt: skip
    assert body["waste"] == {
        "requests": 10 + 2 + 3 + 1 + 10 + 2 * (25 + 25 + 25 + 3 + 1),
        "spend_usd": "123.53",  # tasks 40+5+9.5+1.5+0.5+2+0.03+50, calls 10+1+3+1
        "failed_calls": 2,
        "failed_spend_usd": "1",
        "truncated_calls": 3,
        "truncated_spend_usd": "3",
        "retried_calls": 1,
        "extra_attempts": 2,
        "retried_spend_usd": "1",
        "blocked_calls": 10,
    }


async def test_cost_per_fixed_bug_by_model_and_agent(
    recommend_app: FastAPI, client: httpx.AsyncClient
) -> None:
    known_waste().write(recommend_app.state.runtime.engine)
    act_as(recommend_app, "alice")
    body = await _get(client)
    models = {m["model"]: m for m in body["models"]}
    big = models["big"]
    assert (big["tasks"], big["succeeded"], big["failed"], big["success_rate"]) == (25, 20, 5, 0.8)
    assert big["succeeded_spend_usd"] == "40"
    assert big["failed_spend_usd"] == "5"
    assert big["cost_per_fixed_bug_usd"] == "2.000000"
    assert big["all_in_cost_per_fixed_bug_usd"] == "2.250000"
    assert models["tiny"]["failed"] == 0 and models["bad"]["success_rate"] == 0.2
    agents = {(a["agent"], a["model"]): a for a in body["agents"]}
    fix = agents[("fix_agent", "big")]  # half of each task's spend
    assert (fix["tasks"], fix["succeeded"], fix["cost_per_fixed_bug_usd"]) == (25, 20, "1.000000")


async def test_a_cheaper_model_that_fixes_as_often_is_named_with_its_samples(
    recommend_app: FastAPI, client: httpx.AsyncClient
) -> None:
    known_waste().write(recommend_app.state.runtime.engine)
    act_as(recommend_app, "alice")
    found = [r for r in (await _get(client))["recommendations"] if r["kind"] == "cheaper_model"]
    # On r1 and over all repositories (the same tasks): big -> small; bad fixes far less often
    # and tiny has too few tasks, so neither is ever offered.
    assert [(r["figures"]["model"], r["figures"]["cheaper_model"]) for r in found] == [
        ("big", "small"),
        ("big", "small"),
    ]
    figures = found[0]["figures"]
    assert (figures["model_tasks"], figures["model_succeeded"]) == (25, 20)
    assert (figures["cheaper_model_tasks"], figures["cheaper_model_succeeded"]) == (25, 19)
    assert figures["cheaper_model_cost_per_fixed_bug_usd"] == "0.578947"  # $11 / 19
    assert found[0]["estimated_savings_usd"] == "33.421060"  # 20 x (2.25 - 0.578947)


async def test_waste_and_cache_findings_name_their_figures(
    recommend_app: FastAPI, client: httpx.AsyncClient
) -> None:
    known_waste().write(recommend_app.state.runtime.engine)
    act_as(recommend_app, "alice")
    body = await _get(client)
    kinds = {r["kind"]: r for r in body["recommendations"]}
    # Truncated $3 of $123.53 is 2.4 %: under the 5 % share, so not named; blocked 10 of 184.
    assert "truncated_answers" not in kinds and "failed_calls" not in kinds
    assert kinds["blocked_calls"]["figures"] == {"calls": 10, "requests": 184}
    cache = {c["model"]: c for c in body["cache"]}
    assert cache["small"]["hit_ratio"] == round(120_000 / (150_000 + 1000 * 61), 4)
    assert kinds["low_cache_hit"]["figures"]["model"] == "big"


async def test_a_user_sees_only_their_own_and_an_admin_everyone(
    recommend_app: FastAPI, client: httpx.AsyncClient
) -> None:
    known_waste().write(recommend_app.state.runtime.engine)
    act_as(recommend_app, "bob")
    bob = await _get(client)
    assert bob["waste"]["spend_usd"] == "10" and bob["recommendations"] == []
    assert [m["model"] for m in bob["models"]] == ["big"] and bob["models"][0]["tasks"] == 1
    for query in ("?user_id=alice", "?everyone=true"):
        assert (await client.get(f"/api/v1/usage/recommendations{query}")).status_code == 403

    act_as(recommend_app, "root", "admin")
    everyone = await _get(client, "?everyone=true")
    assert everyone["waste"]["spend_usd"] == "133.53"
    assert (await _get(client, "?user_id=bob"))["waste"] == bob["waste"]


async def test_no_data_at_all_is_zeros_and_no_findings(
    recommend_app: FastAPI, client: httpx.AsyncClient
) -> None:
    act_as(recommend_app, "root", "admin")
    body = await _get(client, "?everyone=true&days=366")
    assert body["waste"]["requests"] == 0 and body["waste"]["spend_usd"] == "0"
    assert (body["models"], body["agents"], body["cache"], body["recommendations"]) == (
        [], [], [], []
    )  # fmt: skip


@pytest.mark.parametrize(
    "query",
    [
        "days=0",
        "days=367",
        "days=-5",
        "days=1e9",
        "days=99999999999999999999999999",
        "user_id=%00",
        "user_id=a%20b",
        "everyone=true&user_id=bob",
    ],
)
async def test_odd_parameters_are_refused_with_a_4xx(
    recommend_app: FastAPI, client: httpx.AsyncClient, query: str
) -> None:
    act_as(recommend_app, "root", "admin")
    response = await client.get(f"/api/v1/usage/recommendations?{query}")
    assert response.status_code == 422, response.text


def test_as_often_means_within_the_samples_margin() -> None:
    incumbent = TaskOutcomes(succeeded=80, failed=20)
    assert not_worse(TaskOutcomes(succeeded=75, failed=25), incumbent)
    assert not not_worse(TaskOutcomes(succeeded=60, failed=40), incumbent)
    # Two perfect records: the pooled margin is 0 and equal is as often.
    assert not_worse(TaskOutcomes(succeeded=30), TaskOutcomes(succeeded=30))


async def test_an_answer_is_reused_until_it_expires_and_the_scan_refreshes_everyones(
    recommend_app: FastAPI, client: httpx.AsyncClient
) -> None:
    runtime = recommend_app.state.runtime
    act_as(recommend_app, "root", "admin")
    first = await _get(client, "?everyone=true")
    known_waste().write(runtime.engine)
    # Reused: the spend written since is not in it yet (RECOMMENDATION_CACHE_SECONDS=300).
    assert await _get(client, "?everyone=true") == first
    assert (await _get(client, "?everyone=true&days=29"))["waste"]["spend_usd"] == "133.53"
    # The dispatcher's scan recomputes everyone's 30-day report ahead of the next request.
    refresh_recommendations(runtime.engine, runtime.settings, NOW)
    assert (await _get(client, "?everyone=true"))["waste"]["spend_usd"] == "133.53"
    # With the cache off every answer is read afresh.
    settings = runtime.settings.model_copy(update={"recommendation_cache_seconds": 0})
    with Session(runtime.engine) as session:
        fresh = recommendations(session, settings, "bob", NOW, 30)
    assert fresh.waste.spend_usd == Decimal(10)
