"""The bundled example task end to end, on two versions of the code side by side.

Each version is served by its own uvicorn (``--backend DIR``: a ``backend/`` directory of a
checkout, e.g. one made with ``git worktree add /tmp/asa-old <commit>``) on a fresh SQLite
database with the built-in simulator; the README's example task (clone, reproduce, FixAgent,
CodeAgent, tests) is submitted and polled until it ends. Rounds alternate between the versions
so both see the same machine load; the figure is the wall time from submit to the final status.

    cd backend && .venv/bin/python ../bench/example_task.py \\
        --backend before=/tmp/asa-old/backend --backend after=. --rounds 5
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

TERMINAL = {"succeeded", "failed", "budget_exceeded", "cancelled", "error"}
BUG = "average() in calculator.py is wrong: average([2, 4, 6]) should be 4"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@contextmanager
def serve(backend: Path, data: Path) -> Iterator[tuple[str, Path]]:
    """The version's app on a free loopback port; yields its URL and its examples directory."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ASA_"))}
    env.update(
        PYTHONPATH=str(backend),
        DATABASE_URL=f"sqlite:///{data / 'asa.db'}",
        SPOOL_DIR=str(data / "spool"),
        EXAMPLES_DIR=str(data / "examples"),
        SIMULATOR_LATENCY_MS="1",
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--port", str(port)],
        cwd=backend,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"{backend}: no /health within 120 s")
        yield url, data / "examples"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def run_task(url: str, examples: Path) -> tuple[float, str]:
    body = {
        "repo_url": str(examples / "buggy-calculator"),
        "bug_description": BUG,
        "test_command": "python3 -m unittest -v",
    }
    started = time.perf_counter()
    submitted = httpx.post(f"{url}/api/v1/task/submit", json=body, timeout=30)
    submitted.raise_for_status()
    task_id = submitted.json()["task_id"]
    while True:
        status = httpx.get(f"{url}/api/v1/task/{task_id}", timeout=30).json()["status"]
        if status in TERMINAL:
            return time.perf_counter() - started, status
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", action="append", required=True, help="NAME=DIR")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    versions = dict(item.split("=", 1) for item in args.backend)
    times: dict[str, list[float]] = {name: [] for name in versions}
    with tempfile.TemporaryDirectory() as scratch:
        for round_number in range(args.rounds):
            for name, backend in versions.items():
                data = Path(scratch) / f"{name}-{round_number}"
                data.mkdir()
                with serve(Path(backend).resolve(), data) as (url, examples):
                    seconds, status = run_task(url, examples)
                if status != "succeeded":
                    raise SystemExit(f"{name}: the example task ended {status}")
                times[name].append(seconds)
    print(f"{'version':<10} {'min s':>7} {'median s':>9} {'max s':>7}  rounds")
    for name, values in times.items():
        print(
            f"{name:<10} {min(values):7.2f} {statistics.median(values):9.2f} "
            f"{max(values):7.2f}  {len(values)}"
        )


if __name__ == "__main__":
    main()
