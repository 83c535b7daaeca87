"""``/api/v1/usage`` over HTTP (ASGI), on SQLite and PostgreSQL.

Rows go in through ``insert_usage`` (so the rollup is the real one); every figure asserted is
computed by hand from the rows below. The clock is pinned to ``NOW``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app.access.principal import Principal
from app.api.v1.usage import utc_now
from app.tasks import store as task_store
from app.tracking.record import UsageRecord
from app.tracking.writer import insert_usage

ADMIN = Principal("root", "admin")

NOW = datetime(2026, 3, 10, 15, 30, tzinfo=UTC)
# days=7 at NOW covers [2026-03-04T00:00Z, 2026-03-11T00:00Z).
WINDOW_START = datetime(2026, 3, 4, tzinfo=UTC)
JUST_BEFORE_WINDOW = datetime(2026, 3, 3, 23, 59, 59, 999999, tzinfo=UTC)


def usage(**fields: Any) -> UsageRecord:
    fields.setdefault("request_id", uuid.uuid4().hex)
    fields.setdefault("status", "success")
    return UsageRecord(**fields)


LEDGER = [
    # 1: t1/alice, fix_agent, gpt-4o; latency bucket (100, 250]
    usage(task_id="t1", user_id="alice", agent="fix_agent", model="gpt-4o",
          prompt_tokens=1000, completion_tokens=200, cached_tokens=100,
          cost_pico_usd=4_500_000_000, latency_ms=120.0,
          timestamp=datetime(2026, 3, 10, 9, 0, tzinfo=UTC)),
    # 2: last microsecond of 2026-03-09; bucket (25, 50]
    usage(task_id="t1", user_id="alice", agent="code_agent", model="gpt-4o-mini",
          prompt_tokens=2000, completion_tokens=500, reasoning_tokens=50,
          cost_pico_usd=600_000_000, latency_ms=40.0,
          timestamp=datetime(2026, 3, 9, 23, 59, 59, 999999, tzinfo=UTC)),
    # 3: an error exactly at the start of the 7-day window; bucket (2500, 5000]
    usage(task_id="t1", user_id="alice", agent="fix_agent", model="gpt-4o", status="error",
          prompt_tokens=300, latency_ms=3000.0, error_message="=HYPERLINK(1)",
          timestamp=WINDOW_START),
    # 4: bob, just before the 7-day window
    usage(task_id="t2", user_id="bob", model="gpt-4o-mini", prompt_tokens=100,
          completion_tokens=10, cost_pico_usd=30_000_000, latency_ms=8.0,
          timestamp=JUST_BEFORE_WINDOW),
    # 5: bob, blocked by a budget; bucket [0, 5]
    usage(task_id="t2", user_id="bob", model="gpt-4o", status="blocked", latency_ms=1.0,
          timestamp=datetime(2026, 3, 10, 10, 0, tzinfo=UTC)),
    # 6: alice without a task, on a model with no price; bucket (50, 100]
    usage(user_id="alice", model="mystery-model", cost_status="unpriced",
          prompt_tokens=50, completion_tokens=5, latency_ms=70.0,
          timestamp=datetime(2026, 3, 8, 12, 0, tzinfo=UTC)),
]  # fmt: skip


def insert(engine: Engine, *records: UsageRecord) -> None:
    with engine.begin() as conn:
        for record in records:
            assert insert_usage(conn, record)


@pytest.fixture
def ledger(engine: Engine) -> list[UsageRecord]:
    insert(engine, *LEDGER)
    return LEDGER


@pytest.fixture
def app(report_app: FastAPI) -> FastAPI:
    report_app.dependency_overrides[utc_now] = lambda: NOW
    return report_app


def pick(items: list[dict[str, Any]], key: str) -> list[tuple[Any, int, str]]:
    return [(i[key], i["requests"], i["cost_usd"]) for i in items]


# -- overall --------------------------------------------------------------------------------


async def test_overall_totals_match_the_hand_computed_sums(
    client: httpx.AsyncClient, ledger: list[UsageRecord]
) -> None:
    response = await client.get("/api/v1/usage/overall", params={"days": 7})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["totals"] == {
        "requests": 5,
        "successes": 3,
        "errors": 1,
        "blocked": 1,
        "unpriced_calls": 1,
        "prompt_tokens": 3350,
        "completion_tokens": 705,
        "cached_tokens": 100,
        "reasoning_tokens": 50,
        "total_tokens": 4055,
        "cost_usd": "0.0051",
        "avg_latency_ms": pytest.approx(646.2),
        # rank 4.75 of 5 falls in (2500, 5000] holding one call: 2500 + 2500 * 0.75
        "p95_latency_ms": pytest.approx(4375.0),
    }


async def test_overall_defaults_to_seven_days_and_reports_its_window(
    client: httpx.AsyncClient, ledger: list[UsageRecord]
) -> None:
    body = (await client.get("/api/v1/usage/overall")).json()

    assert body["window"] == {
        "days": 7,
        "since": "2026-03-04T00:00:00Z",
        "until": "2026-03-11T00:00:00Z",
    }
    assert body["totals"]["requests"] == 5


async def test_overall_breaks_down_by_model_most_expensive_first(
    client: httpx.AsyncClient, ledger: list[UsageRecord]
) -> None:
    body = (await client.get("/api/v1/usage/overall?days=7")).json()

    assert pick(body["by_model"], "model") == [
        ("gpt-4o", 3, "0.0045"),
        ("gpt-4o-mini", 1, "0.0006"),
        ("mystery-model", 1, "0"),
    ]
    mystery = body["by_model"][2]
    assert mystery["unpriced_calls"] == 1
    assert mystery["p95_latency_ms"] == pytest.approx(50 + 50 * 0.95)


async def test_overall_by_day_puts_each_call_on_its_utc_day(
    client: httpx.AsyncClient, ledger: list[UsageRecord]
) -> None:
    body = (await client.get("/api/v1/usage/overall?days=7")).json()

    assert pick(body["by_day"], "day") == [
        ("2026-03-04", 1, "0"),
        ("2026-03-08", 1, "0"),
        ("2026-03-09", 1, "0.0006"),
        ("2026-03-10", 2, "0.0045"),
    ]


async def test_window_includes_its_first_microsecond_and_excludes_the_one_before(
    client: httpx.AsyncClient, ledger: list[UsageRecord]
) -> None:
    seven = (await client.get("/api/v1/usage/overall?days=7")).json()
    eight = (await client.get("/api/v1/usage/overall?days=8")).json()

    assert seven["by_day"][0]["day"] == "2026-03-04"  # row 3, at exactly 00:00:00
    assert seven["totals"]["requests"] == 5
    assert eight["by_day"][0] == {**eight["by_day"][0], "day": "2026-03-03", "requests": 1}
    assert eight["totals"]["requests"] == 6


async def test_one_day_is_today_only(client: httpx.AsyncClient, ledger: list[UsageRecord]) -> None:
    body = (await client.get("/api/v1/usage/overall?days=1")).json()

    assert body["window"]["since"] == "2026-03-10T00:00:00Z"
    assert body["totals"]["requests"] == 2
    assert body["totals"]["blocked"] == 1
    assert body["totals"]["cost_usd"] == "0.0045"


async def test_empty_range_has_zero_totals_and_no_breakdowns(client: httpx.AsyncClient) -> None:
    body = (await client.get("/api/v1/usage/overall?days=365")).json()

    assert body["totals"]["requests"] == 0
    assert body["totals"]["cost_usd"] == "0"
    assert body["totals"]["avg_latency_ms"] is None
    assert body["totals"]["p95_latency_ms"] is None
    assert body["by_model"] == []
    assert body["by_day"] == []


# -- user -----------------------------------------------------------------------------------


async def test_user_view_defaults_to_thirty_days(
    client: httpx.AsyncClient, ledger: list[UsageRecord]
) -> None:
    body = (await client.get("/api/v1/usage/user/bob")).json()

    assert body["user_id"] == "bob"
    assert body["window"]["days"] == 30
    assert body["window"]["since"] == "2026-02-09T00:00:00Z"
    assert body["totals"]["requests"] == 2
    assert body["totals"]["cost_usd"] == "0.00003"
    assert pick(body["by_day"], "day") == [("2026-03-03", 1, "0.00003"), ("2026-03-10", 1, "0")]


async def test_user_view_counts_only_that_users_calls(
    client: httpx.AsyncClient, ledger: list[UsageRecord]
) -> None:
    body = (await client.get("/api/v1/usage/user/alice?days=7")).json()

    totals = body["totals"]
    assert (totals["requests"], totals["successes"], totals["errors"]) == (4, 3, 1)
    assert totals["cost_usd"] == "0.0051"
    assert totals["total_tokens"] == 4055
    assert [m["model"] for m in body["by_model"]] == ["gpt-4o", "gpt-4o-mini", "mystery-model"]


async def test_user_without_calls_gets_an_empty_report(
    client: httpx.AsyncClient, ledger: list[UsageRecord]
) -> None:
    response = await client.get("/api/v1/usage/user/carol")

    assert response.status_code == 200
    assert response.json()["totals"]["requests"] == 0


async def test_user_may_read_own_usage_but_not_anothers(
    client: httpx.AsyncClient, ledger: list[UsageRecord], act_as: Callable[[str], None]
) -> None:
    act_as("alice")

    own = await client.get("/api/v1/usage/user/alice")
    other = await client.get("/api/v1/usage/user/bob")

    assert own.status_code == 200
    assert other.status_code == 403
    assert other.json()["error"] == "forbidden"


# -- task -----------------------------------------------------------------------------------


async def test_task_view_totals_and_breakdowns(
    client: httpx.AsyncClient, ledger: list[UsageRecord]
) -> None:
    body = (await client.get("/api/v1/usage/task/t1")).json()

    assert body["task_id"] == "t1"
    assert body["user_ids"] == ["alice"]
    totals = body["totals"]
    assert (totals["requests"], totals["successes"], totals["errors"]) == (3, 2, 1)
    assert (totals["prompt_tokens"], totals["completion_tokens"]) == (3300, 700)
    assert totals["cost_usd"] == "0.0051"
    assert totals["avg_latency_ms"] == pytest.approx(3160 / 3)
    assert pick(body["by_agent"], "agent") == [
        ("fix_agent", 2, "0.0045"),
        ("code_agent", 1, "0.0006"),
    ]
    assert pick(body["by_model"], "model") == [
        ("gpt-4o", 2, "0.0045"),
        ("gpt-4o-mini", 1, "0.0006"),
    ]
    assert [d["day"] for d in body["by_day"]] == ["2026-03-04", "2026-03-09", "2026-03-10"]


async def test_task_view_covers_the_whole_task_life_and_null_agent(
    client: httpx.AsyncClient, ledger: list[UsageRecord]
) -> None:
    body = (await client.get("/api/v1/usage/task/t2")).json()

    assert body["totals"]["requests"] == 2  # one call is older than any 7-day window
    assert pick(body["by_agent"], "agent") == [(None, 2, "0.00003")]


async def test_unknown_task_is_404(client: httpx.AsyncClient, ledger: list[UsageRecord]) -> None:
    response = await client.get("/api/v1/usage/task/no-such-task")

    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


async def test_task_is_readable_by_its_user_only(
    client: httpx.AsyncClient, ledger: list[UsageRecord], act_as: Callable[[str], None]
) -> None:
    act_as("bob")

    assert (await client.get("/api/v1/usage/task/t2")).status_code == 200
    # Another user's task answers as a task with no usage at all (no existence oracle).
    others = await client.get("/api/v1/usage/task/t1")
    absent = await client.get("/api/v1/usage/task/t9")
    assert others.status_code == absent.status_code == 404
    assert others.json()["detail"].replace("t1", "?") == absent.json()["detail"].replace("t9", "?")


async def test_admin_views_refuse_non_admins(
    client: httpx.AsyncClient, act_as: Callable[[str], None]
) -> None:
    act_as("alice")

    assert (await client.get("/api/v1/usage/overall")).status_code == 403
    assert (await client.get("/api/v1/usage/metrics/tasks")).status_code == 403


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("days", ["0", "366", "-1", "abc", "7.5", "1e1", "", " 7", "99999999999"])
@pytest.mark.parametrize("path", ["/overall", "/user/alice", "/metrics/tasks"])
async def test_days_outside_1_to_365_is_a_422_naming_field_and_range(
    client: httpx.AsyncClient, path: str, days: str
) -> None:
    response = await client.get(f"/api/v1/usage{path}", params={"days": days})

    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "invalid_input"
    [error] = body["detail"]
    assert error["loc"] == ["query", "days"]
    assert "days must be an integer from 1 to 365" in error["msg"]


@pytest.mark.parametrize("bad_id", ["x" * 65, "a b", "a;drop", "-leading", "ünïcode", "a%00b"])
async def test_malformed_ids_are_422(client: httpx.AsyncClient, bad_id: str) -> None:
    for path in (f"/task/{bad_id}", f"/user/{bad_id}"):
        response = await client.get(f"/api/v1/usage{path}")
        assert response.status_code == 422, (path, response.text)
        assert response.json()["error"] == "invalid_input"


async def test_longest_valid_id_is_accepted(client: httpx.AsyncClient) -> None:
    longest = "a" * 64

    assert (await client.get(f"/api/v1/usage/user/{longest}")).status_code == 200
    assert (await client.get(f"/api/v1/usage/task/{longest}")).status_code == 404


# -- task metrics ---------------------------------------------------------------------------


def finish(session: Session, task_id: str, when: datetime, **metrics: str) -> None:
    """Record a finished task's metrics as the orchestrator does (``status__x`` is ``status.x``)."""
    values = {name.replace("__", "."): Decimal(value) for name, value in metrics.items()}
    task_store.write_task_metrics(session, task_id, values, when)


@pytest.fixture
def finished_tasks(engine: Engine) -> None:
    inside = datetime(2026, 3, 9, 8, 0, tzinfo=UTC)
    with Session(engine) as session, session.begin():
        # fmt: off
        finish(session, "a", inside, succeeded="1", duration_seconds="10", cost_usd="0.5",
               status__succeeded="1", attempts="1")
        finish(session, "b", WINDOW_START, succeeded="0", duration_seconds="20",
               cost_usd="0.25", status__failed="1")
        finish(session, "c", NOW, succeeded="0", duration_seconds="40",
               cost_usd="0.000000000001", status__budget_exceeded="1")
        finish(session, "d", JUST_BEFORE_WINDOW, succeeded="1", duration_seconds="1000",
               cost_usd="9", status__succeeded="1")
        # fmt: on


async def test_task_metrics_from_task_metrics_rows(
    client: httpx.AsyncClient, finished_tasks: None
) -> None:
    response = await client.get("/api/v1/usage/metrics/tasks")

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["tasks"], body["succeeded"], body["failed"]) == (3, 1, 2)
    assert body["success_rate"] == pytest.approx(1 / 3)
    assert body["by_status"] == {"succeeded": 1, "failed": 1, "budget_exceeded": 1}
    assert body["duration_seconds"] == {
        "count": 3,
        "avg": pytest.approx(70 / 3),
        # Estimated from the duration histogram: 10 s in (5, 10], 20 s in (10, 20], 40 s in
        # (30, 45]. p50 is rank 1.5 of 3, half-way through (10, 20]; p90 is rank 2.7, 70% into
        # (30, 45] = 40.5, capped at the maximum like p95 and p99.
        "p50": pytest.approx(15.0),
        "p90": pytest.approx(40.0),
        "p95": pytest.approx(40.0),
        "p99": pytest.approx(40.0),
        "max": pytest.approx(40.0),
    }
    assert body["cost"] == {
        "tasks_with_cost": 3,
        "total_usd": "0.750000000001",
        "avg_per_task_usd": "0.25",  # 0.250000000000333... rounded to the picodollar
        "succeeded_tasks_with_cost": 1,  # "a"
        "succeeded_total_usd": "0.5",
        "per_succeeded_task_usd": "0.5",
        "by_phase": [{"phase": "retries", "tasks": 0, "total_usd": "0"}],  # no calls here
    }


async def test_task_metrics_window_includes_older_tasks_when_widened(
    client: httpx.AsyncClient, finished_tasks: None
) -> None:
    body = (await client.get("/api/v1/usage/metrics/tasks?days=8")).json()

    assert body["tasks"] == 4
    assert body["duration_seconds"]["max"] == pytest.approx(1000.0)
    assert body["cost"]["total_usd"] == "9.750000000001"


async def test_task_metrics_with_no_tasks(client: httpx.AsyncClient) -> None:
    body = (await client.get("/api/v1/usage/metrics/tasks?days=30")).json()

    assert (body["tasks"], body["success_rate"], body["by_status"]) == (0, None, {})
    assert body["duration_seconds"]["p95"] is None
    assert body["cost"] == {
        "tasks_with_cost": 0,
        "total_usd": "0",
        "avg_per_task_usd": None,
        "succeeded_tasks_with_cost": 0,
        "succeeded_total_usd": "0",
        "per_succeeded_task_usd": None,
        "by_phase": [{"phase": "retries", "tasks": 0, "total_usd": "0"}],
    }


async def test_openapi_documents_the_typed_responses(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()

    schemas = spec["components"]["schemas"]
    assert {"TaskUsageResponse", "UserUsageResponse", "OverallUsageResponse"} <= set(schemas)
    days = next(
        p
        for p in spec["paths"]["/api/v1/usage/overall"]["get"]["parameters"]
        if p["name"] == "days"
    )
    assert (days["schema"]["minimum"], days["schema"]["maximum"]) == (1, 365)
