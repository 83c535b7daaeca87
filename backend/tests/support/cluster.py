"""The processes of a deployment on this machine: API servers (``uvicorn``, as ``make run``
serves them, optionally ``--workers N``) and ``asa worker`` processes, each a real subprocess on
loopback sharing one database; ``Cluster.kill_all`` ends every one (tests/multiprocess)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

BACKEND = Path(__file__).resolve().parents[2]
BIN = BACKEND / ".venv" / "bin"
TERMINAL = {"succeeded", "failed", "budget_exceeded", "cancelled", "error"}
# The README's example task: the bundled repository and the simulator's scripted fix.
EXAMPLE_BUG = "average() in calculator.py is wrong: average([2, 4, 6]) should be 4"
EXAMPLE_TEST_COMMAND = "python3 -m unittest -v"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Cluster:
    """The processes of one test, sharing one database, examples and workspace root."""

    database_url: str
    root: Path
    procs: list[Proc] = field(default_factory=list)

    def env(self, name: str, **overrides: object) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ASA_"))}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.update(
            DATABASE_URL=self.database_url,
            AUTO_MIGRATE="false",
            SPOOL_DIR=str(self.root / name / "spool"),
            EXAMPLES_DIR=str(self.root / "examples"),
            WORKSPACE_ROOT=str(self.root / "ws"),
            WEB_SESSION_SECRET_FILE=str(self.root / "web_secret"),
            SIMULATOR_LATENCY_MS="1",
            TASK_POLL_INTERVAL_SECONDS="0.2",
            NOTIFICATIONS_DISPATCHER="false",
            BIND_HOST="127.0.0.1",
        )
        env.update({k.upper(): str(v) for k, v in overrides.items()})
        return env

    def start(
        self, name: str, argv: list[str], env: dict[str, str], port: int | None, cwd: Path = BACKEND
    ) -> Proc:
        log = self.root / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        proc = Proc(name, popen, log, port)
        self.procs.append(proc)
        return proc

    def api(self, name: str, *, workers: int = 1, **overrides: object) -> Proc:
        """``uvicorn app.main:create_app`` (as ``make run``) on a free loopback port."""
        port = free_port()
        argv = [str(BIN / "uvicorn"), "app.main:create_app", "--factory"]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
        proc = self.start(name, argv, self.env(name, **overrides), port)
        wait_until(lambda: _healthy(proc), 90, f"{name} serves /health", proc)
        return proc

    def worker(self, name: str, *, metrics_port: int | None = None, **overrides: object) -> Proc:
        """``asa worker``, ready once it logs so."""
        argv = [str(BIN / "asa"), "worker"]
        if metrics_port is not None:
            argv += ["--metrics-port", str(metrics_port)]
        proc = self.start(name, argv, self.env(name, **overrides), metrics_port)
        wait_until(lambda: "ASA worker ready" in proc.output(), 90, f"{name} is ready", proc)
        return proc

    def submit_example(self, api: Proc) -> httpx.Response:
        """The README's example task, submitted to ``api``."""
        body = {
            "repo_url": str(self.root / "examples" / "buggy-calculator"),
            "bug_description": EXAMPLE_BUG,
            "test_command": EXAMPLE_TEST_COMMAND,
        }
        return httpx.post(f"{api.url}/api/v1/task/submit", json=body, timeout=30)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.popen.poll() is None:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(timeout=30)


def _healthy(proc: Proc) -> bool:
    try:
        return httpx.get(f"{proc.url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(
    condition: Callable[[], Any], timeout: float, what: str, proc: Proc | None = None
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.popen.poll() is not None:
            raise AssertionError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.output()}")
        time.sleep(0.2)
    detail = f"\n{proc.output()[-4000:]}" if proc is not None else ""
    raise AssertionError(f"timed out after {timeout} s waiting until {what}{detail}")


def wait_all_done(api: Proc, task_ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}

    def finished() -> bool:
        for task_id in task_ids:
            if task_id not in done:
                task = httpx.get(f"{api.url}/api/v1/task/{task_id}", timeout=10).json()
                if task["status"] in TERMINAL:
                    done[task_id] = task
        return len(done) == len(task_ids)

    wait_until(finished, timeout, f"{len(task_ids)} tasks finish")
    return done
