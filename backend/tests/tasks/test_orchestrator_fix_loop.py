"""The orchestrator's feedback loop with localization: a retry's prompt opens with the new failure
and the code the failed edit touched, and every FixAgent step is a task event with its cost."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.access.principal import Principal
from app.core.runtime import Runtime
from app.models import Task, TaskEvent
from app.schemas.tasks import TaskSubmitRequest
from app.simulator.config import ScriptRule
from app.simulator.server import SimulatorServer
from app.tasks import store as task_store
from app.tasks.orchestrator import Orchestrator
from tests.support.repos import make_repo

PYTHON = os.path.realpath(sys.executable)  # the sandbox does not see the virtual environment
PYTEST = f"env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 {PYTHON} -m pytest -q -p no:cacheprovider"
CODE = "def clamp(x, lo, hi):\n    return max(lo, min(x, lo))\n"
TEST = "from clamp import clamp\n\ndef test_clamp():\n    assert clamp(5, 0, 10) == 5\n"
WRONG = """clamp.py
<<<<<<< SEARCH
    return max(lo, min(x, lo))
=======
    return max(lo, min(x, lo)) or 0
>>>>>>> REPLACE
"""
FIX = WRONG.replace("min(x, lo)) or 0", "min(x, hi))")


def make_clamp_repo(root: Path) -> Path:
    return make_repo(root, {"clamp.py": CODE, "test_clamp.py": TEST})


def run_task(runtime: Runtime, repo: Path, tracer: Tracer) -> Task:
    request = TaskSubmitRequest(
        repo_url=str(repo), bug_description="clamp() ignores hi", test_command=PYTEST
    )
    with Session(runtime.engine) as session, session.begin():
        owner = Principal("bob", "user")
        task_id = task_store.create_task(session, owner, request, "gpt-4o-mini").id
    assert task_store.claim_next(runtime.engine, "test") == task_id
    Orchestrator(runtime, task_id, tracer=tracer, worker_id="test").run()
    with Session(runtime.engine) as session:
        task = session.get(Task, task_id)
        assert task is not None
        return task


def test_a_retry_opens_with_the_new_failure_and_the_code_the_failed_edit_touched(
    runtime_factory: Callable[..., Runtime],
    sim: SimulatorServer,
    tmp_path: Path,
    tracer: Tracer,
    span_exporter: InMemorySpanExporter,
) -> None:
    runtime = runtime_factory(otel_instrumentation_genai_capture_message_content=True)
    sim.state.add_scripts(
        [ScriptRule.model_validate({"match_system": "You are FixAgent", "replies": [WRONG, FIX]})]
    )

    task = run_task(runtime, make_clamp_repo(tmp_path), tracer)

    assert task.status == "succeeded", task.failure_reason
    assert task.attempts == 2
    chats = sorted(
        (s for s in span_exporter.get_finished_spans() if s.name == "chat gpt-4o-mini"),
        key=lambda s: s.start_time or 0,
    )
    first, second = (str((s.attributes or {})["gen_ai.input.messages"]) for s in chats)
    # The first prompt shows the function the test calls, whole and numbered.
    assert first.index("## Bug report") < first.index("    2|     return max(lo, min(x, lo))")
    # The retry opens with the new failure, the reverted edit and the code it touched.
    feedback = second.index("## Your previous attempt did not work")
    touched = second.index("## Code your previous edit changed")
    report = second.index("## Bug report")
    assert feedback < second.index("## Your previous edit (reverted)") < touched < report
    assert touched < second.index("    2|     return max(lo, min(x, lo))") < report
    assert "or 0" in second[feedback:touched]
    with Session(runtime.engine) as session:
        steps = session.scalars(
            select(TaskEvent.message)
            .where(TaskEvent.task_id == task.id, TaskEvent.kind == "step")
            .order_by(TaskEvent.id)
        ).all()
    assert any(s.startswith("attempt 1: localized (tools): clamp") for s in steps)
    answered = [s for s in steps if "FixAgent round 1 (tools): answered" in s]
    assert [s.split(":")[0] for s in answered] == ["attempt 1", "attempt 2"]
    assert all("completion tokens, $" in s for s in answered)
