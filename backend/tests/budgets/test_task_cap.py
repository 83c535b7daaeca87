"""A task's cost cap from ``max_cost_usd``: a user can only lower the cap that applies, an
administrator can raise it; over HTTP, then enforced on real LLM calls, on SQLite and PostgreSQL.

Decision: a user asking for more than the cap gets the cap (202, with the effective cap in the
answer's ``max_cost_usd``) rather than a 422: the request is still one the service can run, and
the caller learns exactly what applies.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.access import api_keys
from app.budgets.guard import worst_case_tokens
from app.core.db import transaction
from app.core.errors import BudgetExceededError
from app.core.money import usd_to_pico
from app.core.runtime import Runtime
from app.main import create_app
from app.simulator.config import ScriptRule
from app.simulator.server import SimulatorServer
from app.tracking.llm_client import LLMClient

MODEL = "cap-model"
PRICES = {MODEL: {"input_mtok": "1", "output_mtok": "2"}}
MESSAGES = [{"role": "user", "content": "capped call"}]
MAX_TOKENS = 50
SUBMISSION = {
    "repo_url": "https://example.org/acme/widgets.git",
    "bug_description": "the widget count is off by one",
    "test_command": "pytest -q",
}


def call_cost() -> Decimal:
    """What one MESSAGES call costs, billed at its worst case (see ``script_exact_usage``)."""
    tokens = worst_case_tokens({"messages": MESSAGES, "model": MODEL, "max_tokens": MAX_TOKENS}, 0)
    return Decimal(tokens.prompt_tokens + 2 * MAX_TOKENS) / 1_000_000


def script_exact_usage(sim: SimulatorServer) -> None:
    request = {"messages": MESSAGES, "model": MODEL, "max_tokens": MAX_TOKENS}
    usage = {
        "prompt_tokens": worst_case_tokens(request, 0).prompt_tokens,
        "completion_tokens": MAX_TOKENS,
        "cached_tokens": 0,
    }
    rule = {"match_model": MODEL, "reply": {"content": "x", "usage": usage}}
    sim.state.add_scripts([ScriptRule.model_validate(rule)])


class Service:
    def __init__(self, runtime: Runtime, app: Any) -> None:
        self.runtime = runtime
        self.app = app
        self.keys: dict[str, str] = {}
        self.clients: list[httpx.AsyncClient] = []

    def issue(self, user: str, role: api_keys.Role) -> None:
        with transaction(self.runtime.session_factory) as session:
            self.keys[user] = api_keys.create_key(session, user_id=user, role=role).key
        self.app.state.access.authenticator.note_key_issued()

    def client(self, user: str) -> httpx.AsyncClient:
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app),
            base_url="http://asa.test",
            headers={"Authorization": f"Bearer {self.keys[user]}"},
        )
        self.clients.append(client)
        return client

    async def submit(self, user: str, **extra: Any) -> dict[str, Any]:
        response = await self.client(user).post("/api/v1/task/submit", json={**SUBMISSION, **extra})
        assert response.status_code == 202, response.text
        answer: dict[str, Any] = response.json()
        return answer

    async def task_limit(self, task_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = (
            (await self.client("root").get(f"/api/v1/limits/tasks/{task_id}")).raise_for_status()
        ).json()
        return answer

    def calls_until_refused(self, task_id: str, user: str, most: int = 6) -> int:
        client = LLMClient(task_id=task_id, user_id=user, runtime=self.runtime)
        for made in range(most):
            try:
                client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS)
            except BudgetExceededError:
                return made
        return most


StartService = Callable[..., Awaitable[Service]]


@pytest.fixture
async def start_service(
    runtime_factory: Callable[..., Runtime], sim: SimulatorServer, tmp_path: Path
) -> AsyncIterator[StartService]:
    started: list[tuple[Any, Service]] = []

    async def start(**overrides: Any) -> Service:
        settings = runtime_factory(
            examples_dir=tmp_path / "examples",
            workspace_root=tmp_path / "ws",
            run_task_worker=False,
            price_overrides=PRICES,
            **overrides,
        ).settings
        app = create_app(settings)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        service = Service(app.state.runtime, app)
        service.issue("root", "admin")
        service.issue("bob", "user")
        started.append((lifespan, service))
        script_exact_usage(sim)
        return service

    yield start
    for lifespan, service in reversed(started):
        for client in service.clients:
            await client.aclose()
        await lifespan.__aexit__(None, None, None)


async def test_a_user_asking_for_more_than_the_cap_gets_the_cap(
    start_service: StartService,
) -> None:
    cap = call_cost() * 2  # two calls, and not a third
    service = await start_service(budget_task_max_usd=cap)

    submitted = await service.submit("bob", max_cost_usd="10000")

    assert Decimal(submitted["max_cost_usd"]) == cap
    limit = await service.task_limit(submitted["task_id"])
    assert (Decimal(limit["limit_usd"]), limit["limit_source"]) == (cap, "default")
    view = (await service.client("bob").get(submitted["status_url"])).json()
    assert Decimal(view["max_cost_usd"]) == cap
    assert service.calls_until_refused(submitted["task_id"], "bob") == 2


async def test_a_user_may_lower_the_cap(start_service: StartService) -> None:
    service = await start_service(budget_task_max_usd=call_cost() * 4)

    submitted = await service.submit("bob", max_cost_usd=str(call_cost()))

    assert Decimal(submitted["max_cost_usd"]) == call_cost()
    limit = await service.task_limit(submitted["task_id"])
    assert (Decimal(limit["limit_usd"]), limit["limit_source"]) == (call_cost(), "override")
    assert service.calls_until_refused(submitted["task_id"], "bob") == 1


async def test_a_user_may_set_a_cap_where_none_applies(start_service: StartService) -> None:
    service = await start_service(budget_task_max_usd=None)

    submitted = await service.submit("bob", max_cost_usd=str(call_cost() * 3))

    assert Decimal(submitted["max_cost_usd"]) == call_cost() * 3
    assert service.calls_until_refused(submitted["task_id"], "bob") == 3


async def test_without_max_cost_the_answer_names_the_cap_that_applies(
    start_service: StartService,
) -> None:
    service = await start_service(budget_task_max_usd=Decimal("0.5"))

    submitted = await service.submit("bob")

    assert Decimal(submitted["max_cost_usd"]) == Decimal("0.5")
    limit = await service.task_limit(submitted["task_id"])
    assert limit["limit_source"] == "default"


async def test_an_administrator_may_raise_the_cap(start_service: StartService) -> None:
    service = await start_service(budget_task_max_usd=call_cost())

    submitted = await service.submit("root", max_cost_usd=str(call_cost() * 3))

    assert Decimal(submitted["max_cost_usd"]) == call_cost() * 3
    limit = await service.task_limit(submitted["task_id"])
    assert (Decimal(limit["limit_usd"]), limit["limit_source"]) == (call_cost() * 3, "override")
    with service.runtime.session_factory() as session:
        from app.models import Task

        task = session.get(Task, submitted["task_id"])
        assert task is not None and task.max_cost_pico_usd == usd_to_pico(call_cost() * 3)
    assert service.calls_until_refused(submitted["task_id"], "root") == 3
