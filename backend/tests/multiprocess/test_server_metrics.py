"""One server run with ``uvicorn --workers 2`` and ``PROMETHEUS_MULTIPROC_DIR``: every scrape of
``/metrics``, whichever process answers it, counts the calls of both processes."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, func, select

from app.models import LLMUsage, Task
from tests.support.cluster import Cluster, wait_all_done

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

TASKS = 4
SCRAPES = 8


def samples(text: str, name: str) -> dict[str, float]:
    return {
        labels: float(value)
        for labels, value in re.findall(rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, re.M)
    }


def test_a_two_process_server_reports_every_call_on_every_scrape(
    pg_cluster: Cluster, pg_engine: Engine, tmp_path: Path
) -> None:
    multiproc = tmp_path / "prometheus-multiproc"
    multiproc.mkdir()
    server = pg_cluster.api(
        "server",
        workers=2,
        prometheus_multiproc_dir=multiproc,
        max_concurrent_tasks=1,  # one task per process: the second goes to the other process
        task_max_running_per_user=2,
    )

    submitted = [pg_cluster.submit_example(server) for _ in range(TASKS)]
    task_ids = [r.json()["task_id"] for r in submitted]
    done = wait_all_done(server, task_ids, timeout=240)

    assert {t["status"] for t in done.values()} == {"succeeded"}
    with pg_engine.connect() as conn:
        calls = conn.scalar(select(func.count()).select_from(LLMUsage))
        pids = {w.split(":")[1] for w in conn.scalars(select(Task.worker_id))}
    assert len(pids) == 2, "both processes ran tasks (else one process's view would pass)"
    for _ in range(SCRAPES):  # the kernel hands each connection to either process
        text = httpx.get(f"{server.url}/metrics", headers={"Connection": "close"}).text
        assert sum(samples(text, "llm_requests_total").values()) == calls
        assert samples(text, "task_success_total") == {'{status="succeeded"}': TASKS}
        assert samples(text, "active_tasks") == {
            '{status="running"}': 0.0,
            '{status="queued"}': 0.0,
        }
    openmetrics = httpx.get(
        f"{server.url}/metrics", headers={"Accept": "application/openmetrics-text"}
    )
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert sum(samples(openmetrics.text, "llm_requests_total").values()) == calls
