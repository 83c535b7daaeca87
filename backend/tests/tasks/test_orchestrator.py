"""The orchestrator run directly: the span tree of a task, and TestGenerator when the suite
does not expose the bug."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.access.principal import LOCAL_USER, Principal
from app.core.runtime import Runtime
from app.models import LLMUsage, Task
from app.sandbox.runner import Isolation, detect_isolation
from app.schemas.tasks import TaskSubmitRequest
from app.simulator.config import ScriptRule
from app.simulator.server import SimulatorServer
from app.tasks import store as task_store
from app.tasks.orchestrator import Orchestrator
from tests.support.repos import make_repo

# The interpreter's own installation (the sandbox never sees the service's virtual environment;
# pytest is installed there too). Plugin autoload would import every installed pytest plugin in
# each run (seconds each).
PYTHON = os.path.realpath(sys.executable)
PYTEST = f"env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 {PYTHON} -m pytest -q -p no:cacheprovider"
CODE = "def clamp(x, lo, hi):\n    return max(lo, min(x, lo))\n"
FIX = """clamp.py
<<<<<<< SEARCH
    return max(lo, min(x, lo))
=======
    return max(lo, min(x, hi))
>>>>>>> REPLACE
"""
REGRESSION_TEST = """test_asa_regression.py
<<<<<<< SEARCH
=======
from clamp import clamp


def test_clamp_keeps_values_inside_the_range():
    assert clamp(5, 0, 10) == 5
>>>>>>> REPLACE
"""


def run_task(
    runtime: Runtime,
    repo: Path,
    tracer: Tracer | None = None,
    *,
    isolation: Isolation | None = None,
    principal: Principal = Principal("bob", "user"),  # noqa: B008 - immutable
    test_command: str = PYTEST,
) -> Task:
    request = TaskSubmitRequest(
        repo_url=str(repo),
        bug_description="clamp() in clamp.py ignores hi",
        test_command=test_command,
    )
    with Session(runtime.engine) as session, session.begin():
        task_id = task_store.create_task(session, principal, request, "gpt-4o-mini").id
    assert task_store.claim_next(runtime.engine, "test") == task_id
    Orchestrator(runtime, task_id, tracer=tracer, isolation=isolation, worker_id="test").run()
    with Session(runtime.engine) as session:
        task = session.get(Task, task_id)
        assert task is not None
        return task


def test_agent_calls_are_children_of_one_task_span(
    runtime: Runtime,
    sim: SimulatorServer,
    tmp_path: Path,
    tracer: Tracer,
    span_exporter: InMemorySpanExporter,
) -> None:
    repo = make_repo(
        tmp_path,
        {
            "clamp.py": CODE,
            "test_clamp.py": "from clamp import clamp\n\n"
            "def test_clamp():\n    assert clamp(5, 0, 10) == 5\n",
        },
    )
    sim.state.add_scripts(
        [ScriptRule.model_validate({"match_system": "You are FixAgent", "reply": FIX})]
    )

    task = run_task(runtime, repo, tracer)

    assert task.status == "succeeded", task.failure_reason
    spans = {s.name: s for s in span_exporter.get_finished_spans()}
    root, agent, llm = spans[f"task {task.id}"], spans["FixAgent"], spans["chat gpt-4o-mini"]
    assert root.parent is None
    assert agent.parent is not None and agent.parent.span_id == root.context.span_id
    assert llm.parent is not None and llm.parent.span_id == agent.context.span_id
    assert {s.context.trace_id for s in spans.values()} == {root.context.trace_id}


def test_test_generator_writes_a_failing_regression_test_when_the_suite_passes(
    runtime: Runtime, sim: SimulatorServer, tmp_path: Path
) -> None:
    repo = make_repo(
        tmp_path, {"clamp.py": CODE, "test_other.py": "def test_nothing():\n    assert True\n"}
    )
    sim.state.add_scripts(
        [
            ScriptRule.model_validate(
                {"match_system": "You are TestGenerator", "reply": REGRESSION_TEST}
            ),
            ScriptRule.model_validate({"match_system": "You are FixAgent", "reply": FIX}),
        ]
    )

    task = run_task(runtime, repo)

    assert task.status == "succeeded", task.failure_reason
    assert "test_asa_regression.py" in (task.diff or "") and "min(x, hi)" in (task.diff or "")
    with Session(runtime.engine) as session:
        agents = session.scalars(
            select(LLMUsage.agent).where(LLMUsage.task_id == task.id).order_by(LLMUsage.timestamp)
        ).all()
    assert agents == ["TestGenerator", "FixAgent"]


def test_a_suite_that_passes_and_a_test_that_cannot_fail_end_as_failed(
    runtime: Runtime, sim: SimulatorServer, tmp_path: Path
) -> None:
    repo = make_repo(
        tmp_path, {"clamp.py": CODE, "test_other.py": "def test_nothing():\n    assert True\n"}
    )
    passing = REGRESSION_TEST.replace("assert clamp(5, 0, 10) == 5", "assert True")
    sim.state.add_scripts(
        [ScriptRule.model_validate({"match_system": "You are TestGenerator", "reply": passing})]
    )

    task = run_task(runtime, repo)

    assert task.status == "failed"
    assert "could not be reproduced" in (task.failure_reason or "")


def test_an_unreachable_repository_fails_the_task_with_the_reason(
    runtime: Runtime, tmp_path: Path
) -> None:
    empty = tmp_path / "not-a-repo"
    empty.mkdir()
    (empty / ".git").mkdir()  # looks like a repository, but git cannot clone it

    task = run_task(runtime, empty)

    assert task.status == "failed" and "Could not prepare the repository" in (
        task.failure_reason or ""
    )


# A test script (run as `python check.py`: quicker than pytest) that creates a file and
# changes a tracked one, as a real suite may (a cache, a snapshot, a generated fixture): none
# of it is the agent's, so none of it is in the diff.
MESSY_CHECK = """import pathlib

from clamp import clamp

pathlib.Path("artifact.txt").write_text("made by the test run\\n")
data = pathlib.Path("data.txt")
data.write_text(data.read_text() + "changed by the test run\\n")
assert clamp(5, 0, 10) == 5
"""
CHECK = "from clamp import clamp\n\nassert clamp(5, 0, 10) == 5\n"


@pytest.mark.skipif(
    detect_isolation().bwrap is None,
    reason=f"a user's task needs bubblewrap: {detect_isolation().bwrap_missing}",
)
def test_the_diff_is_exactly_the_agents_edits_not_what_the_tests_wrote(
    runtime: Runtime, sim: SimulatorServer, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path, {"clamp.py": CODE, "check.py": MESSY_CHECK, "data.txt": "old\n"})
    sim.state.add_scripts(
        [ScriptRule.model_validate({"match_system": "You are FixAgent", "reply": FIX})]
    )

    task = run_task(runtime, repo, test_command=f"{PYTHON} check.py")

    assert task.status == "succeeded", task.failure_reason
    changed = re.findall(r"^diff --git a/(\S+)", task.diff or "", re.MULTILINE)
    assert changed == ["clamp.py"]
    assert "+    return max(lo, min(x, hi))" in (task.diff or "")


def test_without_bubblewrap_a_users_task_is_refused_saying_what_to_install(
    runtime: Runtime, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path, {"clamp.py": CODE})
    legacy = detect_isolation().without_bwrap()

    task = run_task(runtime, repo, isolation=legacy)

    assert task.status == "error"
    assert "apt-get install bubblewrap" in (task.failure_reason or "")
    assert task.tests_before is None  # nothing of the repository ran


def test_without_bubblewrap_the_local_administrator_of_open_mode_still_runs_tasks(
    runtime: Runtime, sim: SimulatorServer, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path, {"clamp.py": CODE, "check.py": CHECK})
    sim.state.add_scripts(
        [ScriptRule.model_validate({"match_system": "You are FixAgent", "reply": FIX})]
    )
    legacy = detect_isolation().without_bwrap()

    task = run_task(
        runtime,
        repo,
        isolation=legacy,
        principal=Principal(LOCAL_USER, "admin"),
        test_command=f"{PYTHON} check.py",
    )

    assert task.status == "succeeded", task.failure_reason
