"""docs/DEPLOYMENT.md, run as written on this machine: its database, API server and worker
commands in order, on a scratch PostgreSQL database, with free loopback ports for 8000 and 9101,
``--workers 2`` for 4 and loopback for every address; the task its last block submits to the
API server (which runs no worker) is run by the worker."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, select

from app.models import Task
from tests.support.cluster import Cluster, free_port, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "DEPLOYMENT.md"
BLOCK = re.compile(r"```bash\n(.*?)```", re.DOTALL)
SERVERS = ("uvicorn ", "asa worker")


def test_the_deployment_commands_run_as_written(
    cluster: Cluster, pg_database: str, pg_engine: Engine, tmp_path: Path
) -> None:
    api_port, metrics_port = free_port(), free_port()
    replacements = {
        "postgresql://postgres@127.0.0.1:5432/asa": pg_database,
        "localhost:8000": f"localhost:{api_port}",
        "--port 8000": f"--port {api_port}",
        "9101": str(metrics_port),
        "/tmp/asa-metrics": str(tmp_path / "metrics"),
        "/tmp/asa-ops.key": str(tmp_path / "ops.key"),
        "0.0.0.0": "127.0.0.1",
        "--workers 4": "--workers 2",
    }
    blocks = BLOCK.findall(DOC.read_text())
    assert len(blocks) == 4 and sum(any(s in b for s in SERVERS) for b in blocks) == 2
    env = cluster.env("doc", task_poll_interval_seconds=0.2)
    for name in ("DATABASE_URL", "AUTO_MIGRATE", "EXAMPLES_DIR"):
        env.pop(name)  # as the reader's shell: the blocks set what they need
    outputs: list[str] = []
    for number, block in enumerate(blocks):
        for written, here in replacements.items():
            block = block.replace(written, here)
        env.update(re.findall(r"^export (\w+)=(\S+)$", block, re.M))  # the reader's shell
        argv = ["bash", "-euo", "pipefail", "-c", block]
        if any(server in block for server in SERVERS):
            proc = cluster.start(f"block{number}", argv, env, None, cwd=ROOT)
            url = f"http://127.0.0.1:{api_port if 'uvicorn' in block else metrics_port}"
            wait_until(lambda u=url: _answers(u), 120, f"block {number} serves", proc)
            continue
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{block}\n{done.stderr}{done.stdout}"
        outputs.append(done.stdout)

    checks = outputs[-1].splitlines()
    assert checks[0].startswith('{"status":"ok"')
    assert int(checks[1]) > 0  # the server's llm_* series
    assert any(line.startswith("active_tasks") for line in checks[2:])  # the worker's /metrics
    task_id = re.search(r'"task_id":"(\w+)"', outputs[-1]).group(1)  # type: ignore[union-attr]

    def finished() -> str | None:
        with pg_engine.connect() as conn:
            status = conn.scalar(select(Task.status).where(Task.id == task_id))
        return status if status in ("succeeded", "failed", "error") else None

    assert wait_until(finished, 180, "the worker runs the submitted task") == "succeeded"
    with pg_engine.connect() as conn:
        worker_id = conn.scalar(select(Task.worker_id).where(Task.id == task_id))
    worker = next(p for p in cluster.procs if "asa worker" in " ".join(map(str, p.popen.args)))
    assert worker_id is not None and os.uname().nodename in worker_id
    assert "ASA worker ready" in worker.output()


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/metrics", timeout=2).status_code in (200, 401)
    except httpx.HTTPError:
        return False
