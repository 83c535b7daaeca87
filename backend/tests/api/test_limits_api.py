"""``/api/v1/limits`` over HTTP (ASGI), on SQLite and PostgreSQL, and the 402 of a refused call."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from app.access.principal import Principal
from app.api.auth import current_principal
from app.core.runtime import Runtime
from app.main import create_app
from app.schemas.limits import BudgetExceededBody, ScopeBudget
from app.simulator.config import ScriptRule
from app.simulator.server import SimulatorServer
from app.tracking.llm_client import LLMClient

MESSAGES = [{"role": "user", "content": "limits api"}]
PRICES = {"limits-model": {"input_mtok": "1", "output_mtok": "2"}}


@pytest.fixture
def runtime_for_api(runtime_factory: Callable[..., Runtime]) -> Runtime:
    return runtime_factory(price_overrides=PRICES, budget_user_daily_usd=Decimal("2.5"))


@pytest.fixture
def app(runtime_for_api: Runtime) -> FastAPI:
    """The real application with its runtime installed as the lifespan would, plus one route
    that makes an LLM call (no real endpoint makes one yet) to show a refusal over HTTP."""
    application = create_app(runtime_for_api.settings)
    application.state.runtime = runtime_for_api
    application.dependency_overrides[current_principal] = lambda: Principal("root", "admin")

    @application.post("/test/llm-call/{task_id}")
    def llm_call(task_id: str, request: Request) -> dict[str, str]:
        runtime: Runtime = request.app.state.runtime
        client = LLMClient(task_id=task_id, user_id="web", runtime=runtime)
        client.chat_completion(messages=MESSAGES, model="limits-model", max_tokens=10)
        return {"status": "called"}

    return application


def act_as_user(app: FastAPI, user_id: str) -> None:
    app.dependency_overrides[current_principal] = lambda: Principal(user_id, "user")


async def test_user_limits_show_the_default_then_an_override_then_the_default_again(
    client: httpx.AsyncClient,
) -> None:
    today = datetime.now(UTC).date()
    body = (await client.get("/api/v1/limits/users/alice")).json()
    assert body["daily"] == {
        "scope": "user_daily",
        "subject_id": "alice",
        "window": "day",
        "window_start": today.isoformat(),
        "window_end": (today + timedelta(days=1)).isoformat(),
        "limit_usd": "2.5",
        "limit_source": "default",
        "soft_threshold": "0.8",
        "spent_usd": "0",
        "reserved_usd": "0",
        "remaining_usd": "2.5",
    }
    assert body["monthly"]["limit_source"] == "none" and body["monthly"]["limit_usd"] is None
    assert body["monthly"]["window_start"] == today.replace(day=1).isoformat()

    put = await client.put(
        "/api/v1/limits/users/alice/daily", json={"limit_usd": "0.000001", "soft_threshold": 0.5}
    )
    assert put.status_code == 200
    assert (put.json()["limit_usd"], put.json()["limit_source"]) == ("0.000001", "override")
    assert put.json()["soft_threshold"] == "0.5"
    got = (await client.get("/api/v1/limits/users/alice")).json()["daily"]
    assert got == put.json()

    assert (await client.delete("/api/v1/limits/users/alice/daily")).status_code == 204
    got = (await client.get("/api/v1/limits/users/alice")).json()["daily"]
    assert (got["limit_usd"], got["limit_source"]) == ("2.5", "default")
    assert (await client.delete("/api/v1/limits/users/alice/daily")).status_code == 404


async def test_a_null_override_makes_a_subject_unlimited(client: httpx.AsyncClient) -> None:
    put = await client.put("/api/v1/limits/users/vip/daily", json={"limit_usd": None})

    assert put.status_code == 200
    assert (put.json()["limit_usd"], put.json()["limit_source"]) == (None, "override")
    assert put.json()["remaining_usd"] is None


async def test_task_and_global_limits_round_trip_and_are_listed(client: httpx.AsyncClient) -> None:
    task = await client.put("/api/v1/limits/tasks/task-7", json={"limit_usd": 3})
    glob = await client.put("/api/v1/limits/global", json={"limit_usd": "100.25"})

    assert task.json()["window"] == "lifetime" and task.json()["window_start"] is None
    assert task.json()["limit_usd"] == "3"
    assert (glob.json()["scope"], glob.json()["subject_id"]) == ("global_daily", None)
    assert (await client.get("/api/v1/limits/tasks/task-7")).json() == task.json()
    assert (await client.get("/api/v1/limits/global")).json() == glob.json()
    listed = (await client.get("/api/v1/limits/overrides")).json()
    assert [(o["scope"], o["subject_id"], o["limit_usd"]) for o in listed["items"]] == [
        ("global_daily", None, "100.25"),
        ("task", "task-7", "3"),
    ]
    assert listed["items"][0]["updated_by"] == "root"
    only_tasks = (await client.get("/api/v1/limits/overrides?scope=task")).json()["items"]
    assert [o["subject_id"] for o in only_tasks] == ["task-7"]
    assert (await client.delete("/api/v1/limits/tasks/task-7")).status_code == 204
    assert (await client.delete("/api/v1/limits/global")).status_code == 204
    assert (await client.get("/api/v1/limits/overrides")).json()["items"] == []


async def test_status_shows_what_a_call_spent(
    client: httpx.AsyncClient, sim: SimulatorServer
) -> None:
    usage = {"prompt_tokens": 1000, "completion_tokens": 10, "cached_tokens": 0}
    sim.state.add_scripts([ScriptRule.model_validate({"reply": {"content": "x", "usage": usage}})])

    assert (await client.post("/test/llm-call/task-spend")).status_code == 200

    # 1000 x $1 + 10 x $2 per million tokens
    task = (await client.get("/api/v1/limits/tasks/task-spend")).json()
    assert (task["spent_usd"], task["reserved_usd"], task["limit_usd"]) == ("0.00102", "0", None)
    user = (await client.get("/api/v1/limits/users/web")).json()
    assert user["daily"]["spent_usd"] == "0.00102"
    assert user["daily"]["remaining_usd"] == "2.49898"


async def test_a_call_over_budget_is_a_402_naming_the_scope(
    client: httpx.AsyncClient, sim: SimulatorServer
) -> None:
    await client.put("/api/v1/limits/tasks/task-poor", json={"limit_usd": "0.00001"})

    answer = await client.post("/test/llm-call/task-poor")

    assert answer.status_code == 402
    body = BudgetExceededBody.model_validate(answer.json())
    assert (body.scope, body.subject_id, body.window_start) == ("task", "task-poor", None)
    assert body.limit_usd == Decimal("0.00001") and body.spent_usd == 0
    assert body.remaining_usd == Decimal("0.00001")
    assert body.requested_usd > body.remaining_usd
    assert "task of task-poor exceeded" in body.detail
    assert sim.state.stats()["requests"] == 0


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/api/v1/limits/users/alice/daily", {"limit_usd": "-1"}),
        ("/api/v1/limits/users/alice/daily", {"limit_usd": "0.0000000000001"}),
        ("/api/v1/limits/users/alice/daily", {"limit_usd": "NaN"}),
        ("/api/v1/limits/users/alice/daily", {"limit_usd": "1000001"}),
        ("/api/v1/limits/users/alice/daily", {"limit_usd": "lots"}),
        ("/api/v1/limits/users/alice/daily", {}),
        ("/api/v1/limits/users/alice/daily", {"limit_usd": 1, "soft_threshold": 0}),
        ("/api/v1/limits/users/alice/daily", {"limit_usd": 1, "soft_threshold": "1.5"}),
        ("/api/v1/limits/users/alice/daily", {"limit_usd": 1, "currency": "EUR"}),
        ("/api/v1/limits/users/alice/weekly", {"limit_usd": 1}),
        ("/api/v1/limits/users/al%20ice/daily", {"limit_usd": 1}),
        ("/api/v1/limits/tasks/" + "t" * 65, {"limit_usd": 1}),
        ("/api/v1/limits/global", {"limit_usd": -0.5}),
    ],
)
async def test_bad_limits_are_422_naming_the_field(
    client: httpx.AsyncClient, path: str, payload: dict[str, Any]
) -> None:
    answer = await client.put(path, json=payload)

    assert answer.status_code == 422
    assert answer.json()["error"] == "invalid_input"
    assert answer.json()["detail"][0]["loc"]
    assert (await client.get("/api/v1/limits/overrides")).json()["items"] == []


async def test_bad_list_parameters_are_422(client: httpx.AsyncClient) -> None:
    for query in ("scope=weekly", "limit=0", "limit=501", "offset=-1"):
        assert (await client.get(f"/api/v1/limits/overrides?{query}")).status_code == 422


async def test_users_read_their_own_limits_and_only_admins_change_them(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    act_as_user(app, "alice")

    assert (await client.get("/api/v1/limits/users/alice")).status_code == 200
    assert (await client.get("/api/v1/limits/users/bob")).status_code == 403
    put = await client.put("/api/v1/limits/users/alice/daily", json={"limit_usd": 99})
    assert put.status_code == 403
    assert (await client.get("/api/v1/limits/global")).status_code == 403


async def test_openapi_documents_the_limits_api(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()

    assert {"/api/v1/limits/users/{user_id}/{period}", "/api/v1/limits/tasks/{task_id}"} <= set(
        spec["paths"]
    )
    assert {"ScopeBudget", "LimitOverrideIn", "UserBudgets"} <= set(spec["components"]["schemas"])
    ScopeBudget.model_json_schema()  # the response model itself is a valid schema
