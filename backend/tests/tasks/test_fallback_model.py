"""Budget-aware model choice: a task whose budget cannot pay for its model's worst case switches
to its cheaper ``fallback_model``, recorded in its events and rows (real tasks: the real
orchestrator, repository, sandbox, budget guard and the openai SDK against the simulator)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.access.principal import Principal
from app.core.runtime import Runtime
from app.models import LLMUsage, Task, TaskEvent
from app.schemas.tasks import TaskSubmitRequest
from app.simulator.config import ScriptRule
from app.simulator.server import SimulatorServer
from app.tasks import store as task_store
from app.tasks.orchestrator import Orchestrator
from app.tasks.views import task_view
from tests.conftest import RuntimeFactory
from tests.support.repos import make_repo
from tests.tasks.test_orchestrator import CODE, FIX, PYTEST

# The big model's worst case (4096 output tokens at $40/M, $0.16) cannot fit in a $0.05 task
# budget; the small one's ($0.0016) can.
PRICES = {
    "big-model": {"input_mtok": "10", "output_mtok": "40"},
    "small-model": {"input_mtok": "0.1", "output_mtok": "0.4"},
}


def run(runtime: Runtime, repo: Path, fallback: str | None) -> Task:
    request = TaskSubmitRequest(
        repo_url=str(repo),
        bug_description="clamp() in clamp.py ignores hi",
        test_command=PYTEST,
        model="big-model",
        fallback_model=fallback,
        max_cost_usd=Decimal("0.05"),
    )
    with Session(runtime.engine) as session, session.begin():
        task_id = task_store.create_task(session, Principal("bob", "user"), request, "big-model").id
    assert task_store.claim_next(runtime.engine, "test") == task_id
    Orchestrator(runtime, task_id, worker_id="test").run()
    with Session(runtime.engine) as session:
        task = session.get(Task, task_id)
        assert task is not None
        session.expunge(task)
        return task


@pytest.fixture
def priced(runtime_factory: RuntimeFactory, sim: SimulatorServer, tmp_path: Path) -> Runtime:
    sim.state.add_scripts(
        [ScriptRule.model_validate({"match_system": "You are FixAgent", "reply": FIX})]
    )
    return runtime_factory(price_overrides=PRICES)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(
        tmp_path,
        {
            "clamp.py": CODE,
            "test_clamp.py": "from clamp import clamp\n\n"
            "def test_clamp():\n    assert clamp(5, 0, 10) == 5\n",
        },
    )


def test_a_task_near_its_cap_switches_to_its_fallback_and_says_so(
    priced: Runtime, repo: Path
) -> None:
    task = run(priced, repo, "small-model")

    assert task.status == "succeeded", task.failure_reason
    assert task.model_switched_at is not None
    with Session(priced.engine) as session:
        rows = session.execute(
            select(LLMUsage.model, LLMUsage.status)
            .where(LLMUsage.task_id == task.id)
            .order_by(LLMUsage.timestamp)
        ).all()
        switches = session.scalars(
            select(TaskEvent.message).where(
                TaskEvent.task_id == task.id, TaskEvent.kind == "model_switch"
            )
        ).all()
    # The refused call is a blocked row of the big model; every call after it is the small one.
    assert rows[0] == ("big-model", "blocked")
    assert {tuple(r) for r in rows[1:]} == {("small-model", "success")}
    (switch,) = switches
    assert switch.startswith("big-model -> small-model: the next call's worst case")
    view = task_view(task, (0, 0), "/api/v1/tasks/x")
    assert (view.model, view.fallback_model) == ("big-model", "small-model")
    assert view.model_switched_at == task.model_switched_at


def test_without_a_fallback_the_same_task_stops_at_its_budget(priced: Runtime, repo: Path) -> None:
    task = run(priced, repo, None)
    assert task.status == "budget_exceeded"
    assert task.model_switched_at is None


def test_a_fallback_equal_to_the_model_is_refused() -> None:
    with pytest.raises(ValidationError, match="fallback_model must differ"):
        TaskSubmitRequest(
            repo_url="https://example.com/r.git",
            bug_description="b",
            test_command="pytest",
            model="m",
            fallback_model="m",
        )
    with pytest.raises(ValidationError):
        TaskSubmitRequest(
            repo_url="https://example.com/r.git",
            bug_description="b",
            test_command="pytest",
            fallback_model="bad model name; rm -rf /",
        )
