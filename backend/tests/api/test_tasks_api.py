"""The agent end to end through the HTTP API: real git, real subprocesses, the real openai SDK
against the simulator's scripted replies, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.core.runtime import Runtime
from app.main import create_app
from app.models import LLMUsage, TaskMetrics
from app.simulator.config import ScriptRule
from app.simulator.server import SimulatorServer
from tests.support.repos import make_repo

BUGGY = '''\
def is_even(n):
    """True when n is even."""
    return n % 2 == 1


def double(n):
    return n * 2
'''
TESTS = """\
from mathlib import double, is_even


def test_is_even():
    assert is_even(4)
    assert not is_even(3)


def test_double():
    assert double(3) == 6
"""
GOOD_FIX = """mathlib.py
<<<<<<< SEARCH
    return n % 2 == 1
=======
    return n % 2 == 0
>>>>>>> REPLACE
"""
BREAKING_FIX = """mathlib.py
<<<<<<< SEARCH
    return n % 2 == 1
=======
    return n % 2 == 0
>>>>>>> REPLACE

mathlib.py
<<<<<<< SEARCH
    return n * 2
=======
    return n * 3
>>>>>>> REPLACE
"""
BAD_EDIT = """mathlib.py
<<<<<<< SEARCH
    return n % 3 == 1
=======
    return n % 2 == 0
>>>>>>> REPLACE
"""
# Plugin autoload would import every installed pytest plugin in each run (seconds each).
# The interpreter's installation: test commands run sandboxed, and the sandbox never sees the
# service's virtual environment (pytest is installed in the installation too).
PYTHON = os.path.realpath(sys.executable)
PYTEST = f"env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 {PYTHON} -m pytest -q -p no:cacheprovider"
TERMINAL = {"succeeded", "failed", "budget_exceeded", "cancelled", "error"}


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


@pytest.fixture
def buggy_repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path, {"mathlib.py": BUGGY, "test_mathlib.py": TESTS})


def fix_script(sim: SimulatorServer, *replies: Any, usage: dict[str, int] | None = None) -> None:
    items = [{"content": r, "usage": usage} if usage else r for r in replies]
    sim.state.add_scripts(
        [ScriptRule.model_validate({"match_system": "You are FixAgent", "replies": items})]
    )


ClientFactory = Callable[..., Any]


@pytest.fixture
async def api(
    runtime_factory: Callable[..., Runtime], tmp_path: Path
) -> AsyncIterator[Callable[..., Any]]:
    """Start the app (lifespan included, worker running) with settings overrides."""
    stack: list[Any] = []

    async def start(**overrides: Any) -> httpx.AsyncClient:
        settings = runtime_factory(
            examples_dir=tmp_path / "examples",
            workspace_root=tmp_path / "ws",
            task_poll_interval_seconds=0.1,
            **overrides,
        ).settings
        app = create_app(settings)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://asa.test"
        )
        stack.append((lifespan, client))
        return client

    yield start
    for lifespan, client in reversed(stack):
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


async def submit(client: httpx.AsyncClient, repo: Path, **extra: Any) -> str:
    body = {
        "repo_url": str(repo),
        "bug_description": "is_even in mathlib.py is wrong",
        "test_command": PYTEST,
    }
    body.update(extra)
    response = await client.post("/api/v1/task/submit", json=body)
    assert response.status_code == 202, response.text
    data = response.json()
    assert data["status"] == "queued" and data["status_url"] == f"/api/v1/task/{data['task_id']}"
    return str(data["task_id"])


async def wait_done(
    client: httpx.AsyncClient, task_id: str, timeout: float = 60.0
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        data: dict[str, Any] = (await client.get(f"/api/v1/task/{task_id}")).json()
        if data["status"] in TERMINAL:
            return data
        await asyncio.sleep(0.1)
    raise AssertionError(f"task {task_id} did not finish: {data}")


async def test_a_one_line_bug_is_fixed_end_to_end(
    api: Any, sim: SimulatorServer, buggy_repo: Path
) -> None:
    fix_script(sim, GOOD_FIX, usage={"prompt_tokens": 1000, "completion_tokens": 100})
    client = await api()

    task_id = await submit(client, buggy_repo, model="gpt-4o-mini")
    task = await wait_done(client, task_id)

    assert task["status"] == "succeeded", task
    result = task["result"]
    assert "-    return n % 2 == 1" in result["diff"] and "+    return n % 2 == 0" in result["diff"]
    assert result["tests_before"]["exit_code"] != 0 and result["tests_before"]["failed"] == 1
    assert result["tests_after"]["exit_code"] == 0 and result["tests_after"]["passed"] == 2
    # one FixAgent call: 1000 x $0.15 + 100 x $0.60 per million tokens
    assert task["cost_usd"] == "0.00021" and task["llm_calls"] == 1
    runtime: Runtime = client._transport.app.state.runtime  # type: ignore[attr-defined]
    with runtime.session_factory() as session:
        agents = session.scalars(select(LLMUsage.agent).where(LLMUsage.task_id == task_id)).all()
        metrics = {
            m.metric_name: m.metric_value
            for m in session.scalars(select(TaskMetrics).where(TaskMetrics.task_id == task_id))
        }
    assert agents == ["FixAgent"]
    assert metrics["succeeded"] == 1 and metrics["llm_calls"] == 1 and metrics["attempts"] == 1


async def test_an_edit_that_does_not_apply_is_repaired_after_feedback(
    api: Any, sim: SimulatorServer, buggy_repo: Path
) -> None:
    fix_script(sim, BAD_EDIT)
    sim.state.add_scripts(
        [
            ScriptRule.model_validate(
                {"match_system": "You are CodeAgent", "match_user": "n % 3", "reply": GOOD_FIX}
            )
        ]
    )
    client = await api()

    task = await wait_done(client, await submit(client, buggy_repo))

    assert task["status"] == "succeeded", task
    assert task["llm_calls"] == 2


async def test_a_fix_that_breaks_another_test_is_retried(
    api: Any, sim: SimulatorServer, buggy_repo: Path
) -> None:
    fix_script(sim, BREAKING_FIX, GOOD_FIX)
    client = await api()

    task = await wait_done(client, await submit(client, buggy_repo, max_attempts=3))

    assert task["status"] == "succeeded", task
    assert task["attempts"] == 2
    assert "n * 3" not in task["result"]["diff"]


async def test_budget_running_out_mid_task_keeps_the_best_diff(
    api: Any, sim: SimulatorServer, buggy_repo: Path
) -> None:
    # Each FixAgent call costs 100k x $2.50 / 1M = $0.25 on gpt-4o. The task may spend $0.28:
    # the worst case of a second call (4096 output tokens x $10 / 1M) no longer fits.
    fix_script(
        sim, BREAKING_FIX, GOOD_FIX, usage={"prompt_tokens": 100_000, "completion_tokens": 0}
    )
    client = await api()

    task = await wait_done(
        client,
        await submit(client, buggy_repo, model="gpt-4o", max_cost_usd="0.28", max_attempts=3),
    )

    assert task["status"] == "budget_exceeded", task
    assert "n * 3" in task["result"]["diff"]  # the best (only) attempt's diff is kept
    assert task["llm_calls"] == 1 and task["cost_usd"] == "0.25"
    runtime: Runtime = client._transport.app.state.runtime  # type: ignore[attr-defined]
    with runtime.session_factory() as session:
        statuses = session.scalars(
            select(LLMUsage.status).where(LLMUsage.task_id == task["task_id"])
        ).all()
    assert sorted(statuses) == ["blocked", "success"]  # the second call never reached the provider


async def test_failing_fixes_end_in_failed_after_max_attempts(
    api: Any, sim: SimulatorServer, buggy_repo: Path
) -> None:
    fix_script(sim, BREAKING_FIX)
    client = await api()

    task = await wait_done(client, await submit(client, buggy_repo, max_attempts=2))

    assert task["status"] == "failed" and task["attempts"] == 2
    assert "2 attempt" in task["result"]["failure_reason"]
    assert task["result"]["diff"]


async def test_a_queued_task_is_cancelled_at_once(api: Any, buggy_repo: Path) -> None:
    client = await api(run_task_worker=False)
    task_id = await submit(client, buggy_repo)

    response = await client.post(f"/api/v1/task/{task_id}/cancel")

    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    again = await client.post(f"/api/v1/task/{task_id}/cancel")
    assert again.status_code == 409


async def test_a_running_task_is_cancelled_at_its_next_step(
    api: Any, sim: SimulatorServer, tmp_path: Path
) -> None:
    repo = make_repo(
        tmp_path, {"slow_test.py": "import time\ntime.sleep(2)\nraise SystemExit(1)\n"}
    )
    client = await api()
    task_id = await submit(client, repo, test_command=f"{PYTHON} slow_test.py")
    for _ in range(100):
        if (await client.get(f"/api/v1/task/{task_id}")).json()["step"] == "reproducing":
            break
        await asyncio.sleep(0.05)

    assert (await client.post(f"/api/v1/task/{task_id}/cancel")).status_code == 200
    task = await wait_done(client, task_id)

    assert task["status"] == "cancelled"
    assert task["llm_calls"] == 0


async def test_a_hanging_test_command_is_killed_and_the_task_ends(
    api: Any, sim: SimulatorServer, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path, {"hang.py": "import time\ntime.sleep(1000)\n"})
    fix_script(sim, "no edits here")
    client = await api(task_test_timeout_seconds=1)

    task = await wait_done(
        client, await submit(client, repo, test_command=f"{PYTHON} hang.py", max_attempts=1)
    )

    assert task["status"] == "failed"
    assert task["result"]["tests_before"]["timed_out"] is True


async def test_the_test_command_never_sees_the_providers_key(
    api: Any, sim: SimulatorServer, tmp_path: Path
) -> None:
    repo = make_repo(
        tmp_path, {"leak.py": "import os, sys\nprint(sorted(os.environ.items()))\nsys.exit(1)\n"}
    )
    fix_script(sim, "nothing")
    client = await api()

    task = await wait_done(
        client, await submit(client, repo, test_command=f"{PYTHON} leak.py", max_attempts=1)
    )

    before = task["result"]["tests_before"]["summary"]
    assert "HOME" in before
    assert "sk-test-canary-key-0000" not in before and "DATABASE_URL" not in before


@pytest.mark.parametrize(
    "repo_url",
    [
        "ext::sh -c touch% /tmp/asa-pwned",
        "--upload-pack=touch /tmp/asa-pwned",
        "../",
        "relative/path",
        "http://example.com/repo.git",
        "https://user:secret@example.com/repo.git",
        "/nonexistent/repository",
    ],
)
async def test_hostile_repo_urls_are_refused_with_422(api: Any, repo_url: str) -> None:
    client = await api(run_task_worker=False)
    body = {"repo_url": repo_url, "bug_description": "x", "test_command": "pytest"}

    response = await client.post("/api/v1/task/submit", json=body)

    assert response.status_code == 422, response.text
    assert response.json()["field"] == "repo_url"
    assert not Path("/tmp/asa-pwned").exists()


@pytest.mark.parametrize(
    "patch",
    [
        {"bug_description": ""},
        {"test_command": "pytest | tee out"},
        {"max_attempts": 0},
        {"max_cost_usd": "-1"},
        {"model": "bad model name"},
        {"ref": "--upload-pack=x"},
        {"unexpected": 1},
    ],
)
async def test_bad_submissions_get_a_clear_422(
    api: Any, buggy_repo: Path, patch: dict[str, Any]
) -> None:
    client = await api(run_task_worker=False)
    body = {
        "repo_url": str(buggy_repo),
        "bug_description": "bug",
        "test_command": "pytest",
        **patch,
    }

    response = await client.post("/api/v1/task/submit", json=body)

    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid_input"


async def test_tasks_are_listed_with_paging_and_a_status_filter(api: Any, buggy_repo: Path) -> None:
    client = await api(run_task_worker=False)
    ids = [await submit(client, buggy_repo) for _ in range(3)]
    await client.post(f"/api/v1/task/{ids[0]}/cancel")

    page = (await client.get("/api/v1/task", params={"limit": 2})).json()
    cancelled = (await client.get("/api/v1/task", params={"status": "cancelled"})).json()

    assert page["total"] == 3 and len(page["items"]) == 2
    assert [t["task_id"] for t in cancelled["items"]] == [ids[0]]
    assert (await client.get("/api/v1/task", params={"status": "bogus"})).status_code == 422


async def test_unknown_task_is_404(api: Any) -> None:
    client = await api(run_task_worker=False)
    assert (await client.get("/api/v1/task/tsk_doesnotexist")).status_code == 404
    assert (await client.get("/api/v1/task/..%2F..%2Fetc")).status_code in (404, 422)


async def test_progress_streams_as_server_sent_events(
    api: Any, sim: SimulatorServer, buggy_repo: Path
) -> None:
    fix_script(sim, GOOD_FIX)
    client = await api()
    task_id = await submit(client, buggy_repo)

    async with client.stream("GET", f"/api/v1/task/{task_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = ""
        async for chunk in response.aiter_text():
            body += chunk
            if "event: end" in body:
                break

    assert "event: step" in body and '"succeeded"' in body
