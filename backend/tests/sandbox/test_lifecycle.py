"""The lifecycle of a sandboxed command and of the task around it: cancel kills the command at
once, a stop is bounded and requeues, and the next start reaps what a killed service left.

Timings here are behaviour with a generous margin (a command that would run a minute ends in a
few seconds); the figures themselves are in bench/sandbox_cost.py.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.access.principal import Principal
from app.core.config import BACKEND_DIR
from app.core.runtime import Runtime
from app.models import Task, TaskEvent
from app.sandbox.cgroup import CgroupSupport
from app.sandbox.runner import detect_isolation, run_sandboxed
from app.sandbox.workspace import Workspace
from app.schemas.tasks import TaskSubmitRequest
from app.simulator.config import ScriptRule
from app.simulator.server import SimulatorServer
from app.tasks import store as task_store
from app.tasks.worker import TaskWorker
from tests.support.repos import make_repo

PY = os.path.realpath(sys.executable)  # the sandbox sees the interpreter, not the venv
# A user's task runs only under bubblewrap (without it, it is refused: tests/tasks says so).
needs_bwrap = pytest.mark.skipif(
    detect_isolation().bwrap is None,
    reason=f"no working bubblewrap here: {detect_isolation().bwrap_missing}",
)


def alive_with(token: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if token.encode() in (entry / "cmdline").read_bytes():
                    state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state not in ("Z", "X"):
                        found.append(int(entry.name))
            except OSError:
                continue
    return found


def running_command(argv: str) -> bool:
    """Whether a process runs with exactly this NUL-separated command line."""
    wanted = f"{argv}\0".encode()
    for pid in alive_with(argv.split("\0")[-1]):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes() == wanted:
                return True
    return False


def wait_for(condition: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


SLOW = "import sys, time\ntime.sleep(float(sys.argv[1]))\n"


def submit(runtime: Runtime, repo: Path, test_command: str) -> str:
    request = TaskSubmitRequest(
        repo_url=str(repo), bug_description="slow", test_command=test_command, max_attempts=1
    )
    with Session(runtime.engine) as session, session.begin():
        return task_store.create_task(session, Principal("bob", "user"), request, "gpt-4o-mini").id


def task_of(runtime: Runtime, task_id: str) -> Task:
    with Session(runtime.engine) as session:
        task = session.get(Task, task_id)
        assert task is not None
        session.expunge(task)
        return task


# --- a command ---------------------------------------------------------------------------------


def test_cancel_kills_a_running_command_at_once(tmp_path: Path) -> None:
    token = f"60.{secrets.randbelow(10**9)}"
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()

    result = run_sandboxed(["sleep", token], tmp_path, timeout_s=120, cancel=cancel)

    assert result.cancelled and not result.timed_out and result.exit_code == -9
    assert result.duration_s < 5  # not the minute the command asked for
    assert alive_with(token) == []


def test_a_command_cancelled_before_it_starts_never_runs(tmp_path: Path) -> None:
    cancel = threading.Event()
    cancel.set()

    result = run_sandboxed(["touch", "ran"], tmp_path, timeout_s=10, cancel=cancel)

    assert result.cancelled
    assert not (tmp_path / "ran").exists()


# --- a task ------------------------------------------------------------------------------------


@pytest.fixture
def worker_runtime(runtime_factory: Callable[..., Runtime], tmp_path: Path) -> Runtime:
    return runtime_factory(workspace_root=tmp_path / "ws", task_poll_interval_seconds=0.1)


@needs_bwrap
def test_cancelling_a_running_task_kills_its_test_at_once(
    worker_runtime: Runtime, tmp_path: Path
) -> None:
    token = f"60.{secrets.randbelow(10**9)}"
    repo = make_repo(tmp_path, {"slow.py": SLOW})
    task_id = submit(worker_runtime, repo, f"{PY} slow.py {token}")
    worker = TaskWorker(worker_runtime)
    worker.start()
    try:
        wait_for(lambda: alive_with(token), 20, "the test command to start")
        with Session(worker_runtime.engine) as session, session.begin():
            task_store.request_cancel(session, session.get(Task, task_id))  # type: ignore[arg-type]
        asked = time.monotonic()
        worker.wake()  # what the API does after committing the cancellation

        wait_for(lambda: task_of(worker_runtime, task_id).status == "cancelled", 10, "cancel")

        assert time.monotonic() - asked < 5  # not the minute the test asked for
        assert alive_with(token) == []
    finally:
        worker.stop(timeout=5)


@needs_bwrap
def test_a_stop_kills_the_running_test_and_requeues_its_task_within_the_bound(
    worker_runtime: Runtime, tmp_path: Path
) -> None:
    token = f"60.{secrets.randbelow(10**9)}"
    repo = make_repo(tmp_path, {"slow.py": SLOW})
    task_id = submit(worker_runtime, repo, f"{PY} slow.py {token}")
    worker = TaskWorker(worker_runtime)
    worker.start()
    wait_for(lambda: alive_with(token), 20, "the test command to start")
    asked = time.monotonic()

    worker.stop(timeout=5)

    assert time.monotonic() - asked < 6
    assert alive_with(token) == []
    task = task_of(worker_runtime, task_id)
    assert task.status == "queued" and task.worker_id is None


@needs_bwrap
def test_a_stop_requeues_a_task_stuck_in_an_llm_call_when_its_time_is_up(
    worker_runtime: Runtime, sim: SimulatorServer, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path, {"failing.py": "raise SystemExit(1)\n"})
    sim.state.add_scripts(
        [
            ScriptRule.model_validate(
                {"match_system": "You are FixAgent", "reply": {"content": "x", "latency_ms": 4000}}
            )
        ]
    )
    task_id = submit(worker_runtime, repo, f"{PY} failing.py")
    worker = TaskWorker(worker_runtime)
    worker.start()
    wait_for(lambda: task_of(worker_runtime, task_id).step == "fixing", 20, "the LLM call")
    asked = time.monotonic()

    worker.stop(timeout=1)

    assert time.monotonic() - asked < 3
    task = task_of(worker_runtime, task_id)
    assert task.status == "queued" and task.worker_id is None
    with Session(worker_runtime.engine) as session:
        events = session.scalars(
            select(TaskEvent.message).where(TaskEvent.task_id == task_id)
        ).all()
    assert "requeued: the worker is shutting down" in events


SERVICE = """
import sys
from pathlib import Path
from app.sandbox.runner import run_sandboxed
from app.sandbox.workspace import Workspace
with Workspace(Path(sys.argv[1])) as ws:
    print(ws.path, flush=True)
    run_sandboxed(["sleep", sys.argv[2]], ws.path, timeout_s=600)
"""


def test_the_next_start_reaps_what_a_killed_service_left(
    worker_runtime: Runtime, tmp_path: Path
) -> None:
    root = worker_runtime.settings.workspace_root
    assert root is not None
    token = f"600.{secrets.randbelow(10**9)}"
    service = subprocess.Popen(
        [sys.executable, "-c", SERVICE, str(root), token],
        cwd=BACKEND_DIR,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert service.stdout is not None
    leftover = Path(service.stdout.readline().strip())
    wait_for(lambda: running_command(f"sleep\0{token}"), 20, "the service's command")
    cgroups = detect_isolation().cgroups
    owner = f"{service.pid}-"
    service.send_signal(signal.SIGKILL)
    service.wait(timeout=5)
    foreign = root / "asa-job-made-by-an-older-version"  # unlocked, but not ours to judge
    foreign.mkdir()
    with Workspace(root) as live:  # a live service's workspace: never reaped
        worker = TaskWorker(worker_runtime)

        worker.start()
        worker.stop(timeout=5)

        assert not leftover.exists()
        assert live.path.is_dir() and foreign.is_dir()
    assert alive_with(token) == []
    if isinstance(cgroups, CgroupSupport):
        assert not [d for b in cgroups.bases for d in b.iterdir() if d.name.startswith(owner)]
