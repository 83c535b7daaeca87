"""``asa worker`` processes beside an API process that runs no worker: they share the queue on
PostgreSQL (every task run exactly once), each serves its own ``/metrics``, and SIGTERM stops
one gracefully, its running task back in the queue."""

from __future__ import annotations

import re
import signal
import time

import httpx
import pytest
from sqlalchemy import Engine, func, select

from app.models import LLMUsage, Task
from tests.support.cluster import Cluster, free_port, wait_all_done, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

TASKS = 6
WORKER = {"max_concurrent_tasks": 2, "task_max_running_per_user": 4}
API_ONLY = {"run_task_worker": "false", **WORKER}
TOKEN = "metrics-token-0123456789"


def llm_requests(metrics_text: str) -> float:
    return sum(
        float(value)
        for value in re.findall(r"^llm_requests_total\{[^}]*\} (\S+)$", metrics_text, re.M)
    )


def test_two_workers_and_an_api_only_process_run_every_task_exactly_once(
    pg_cluster: Cluster, pg_engine: Engine
) -> None:
    api = pg_cluster.api("api", **API_ONLY)
    ports = [free_port(), free_port()]
    workers = [
        pg_cluster.worker(f"worker{i}", metrics_port=port, metrics_token=TOKEN, **WORKER)
        for i, port in enumerate(ports)
    ]

    submitted = [pg_cluster.submit_example(api) for _ in range(TASKS)]
    assert [r.status_code for r in submitted] == [202] * TASKS, [r.text for r in submitted]
    task_ids = [r.json()["task_id"] for r in submitted]
    done = wait_all_done(api, task_ids, timeout=240)

    assert {t["status"] for t in done.values()} == {"succeeded"}
    with pg_engine.connect() as conn:
        rows = conn.execute(select(Task.id, Task.runs, Task.worker_id)).all()
        calls = dict(
            conn.execute(select(LLMUsage.task_id, func.count()).group_by(LLMUsage.task_id)).all()
        )
    assert {row.id for row in rows} == set(task_ids)
    assert all(row.runs == 1 for row in rows)  # claimed once, never restarted elsewhere
    worker_pids = {row.worker_id.split(":")[1] for row in rows}
    assert worker_pids == {str(w.popen.pid) for w in workers}  # both took tasks, the API none
    assert len(set(calls.values())) == 1 and set(calls) == set(task_ids)  # same calls per task
    # Prometheus scrapes each worker: together they count every call the ledger has.
    scraped = [
        httpx.get(
            f"http://127.0.0.1:{port}/metrics",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )
        for port in ports
    ]
    assert [s.status_code for s in scraped] == [200, 200]
    assert sum(llm_requests(s.text) for s in scraped) == sum(calls.values())
    assert httpx.get(f"http://127.0.0.1:{ports[0]}/metrics", timeout=10).status_code == 401


def test_sigterm_stops_a_worker_gracefully_and_requeues_its_running_task(
    pg_cluster: Cluster, pg_engine: Engine
) -> None:
    api = pg_cluster.api("api", **API_ONLY)
    worker = pg_cluster.worker("worker", task_stop_timeout_seconds=5, **WORKER)
    submitted = httpx.post(
        f"{api.url}/api/v1/task/submit",
        json={
            "repo_url": str(pg_cluster.root / "examples" / "buggy-calculator"),
            "bug_description": "the suite hangs",
            "test_command": "python3 -c 'import time; time.sleep(120)'",
        },
        timeout=30,
    )
    assert submitted.status_code == 202, submitted.text
    task_id = submitted.json()["task_id"]

    def running() -> bool:
        with pg_engine.connect() as conn:
            return conn.scalar(select(Task.status).where(Task.id == task_id)) == "running"

    wait_until(running, 60, "the worker runs the task", worker)
    time.sleep(1.0)  # into its test command
    started = time.monotonic()
    worker.popen.send_signal(signal.SIGTERM)
    status = worker.popen.wait(timeout=60)
    took = time.monotonic() - started

    assert status == 0, worker.output()
    assert took < 5 + 15, took  # TASK_STOP_TIMEOUT_SECONDS plus shutdown, not the 120 s command
    assert "SIGTERM received, stopping" in worker.output()
    assert "ASA worker stopped" in worker.output()
    with pg_engine.connect() as conn:
        task = conn.execute(select(Task.status, Task.worker_id).where(Task.id == task_id)).one()
    assert task.status == "queued"  # another worker takes it from the start
