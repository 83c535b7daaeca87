"""One caller's task submissions across three API processes: held to one limit on PostgreSQL
(the bucket is a row every process updates), per process on SQLite (documented)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, func, select

from app.core.migrations import upgrade_to_head
from app.models import RateLimitBucket, Task
from tests.support.cluster import Cluster, Proc

pytestmark = pytest.mark.slow

BURST = 4
SUBMISSIONS = 18  # six to each process, all at once
LIMITS = {
    "task_submit_rate_per_minute": 0.1,  # one token per 10 minutes: none comes back mid-test
    "task_submit_burst": BURST,
    "task_max_queued_per_user": 100,
    "run_task_worker": "false",  # the queue only fills; nothing runs
}


def burst(cluster: Cluster, apis: list[Proc]) -> list[tuple[int, httpx.Response]]:
    """SUBMISSIONS submissions from one caller (open local mode: the local administrator),
    spread over the processes, concurrently; (process index, answer) each."""
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(
            pool.map(lambda i: cluster.submit_example(apis[i % len(apis)]), range(SUBMISSIONS))
        )
    return [(i % len(apis), answer) for i, answer in enumerate(answers)]


@pytest.mark.postgres
def test_a_burst_across_three_processes_is_held_to_one_limit(
    pg_cluster: Cluster, pg_engine: Engine
) -> None:
    apis = [pg_cluster.api(f"api{i}", **LIMITS) for i in range(3)]

    answers = burst(pg_cluster, apis)

    accepted = [a for _, a in answers if a.status_code == 202]
    refused = [(i, a) for i, a in answers if a.status_code == 429]
    assert len(accepted) == BURST, [a.text for _, a in answers]
    assert len(refused) == SUBMISSIONS - BURST
    for _, answer in refused:  # the answer the single-process limiter gave, unchanged
        assert answer.json()["error"] == "rate_limited"
        assert 0 < int(answer.headers["retry-after"]) <= 600
    assert {i for i, _ in refused} == {0, 1, 2}  # every process refuses once the bucket is empty
    with pg_engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Task)) == BURST
        buckets = conn.scalars(select(RateLimitBucket.bucket_key)).all()
    assert buckets == ["task_submit:user:local"]


def test_on_sqlite_each_process_keeps_its_own_bucket(cluster: Cluster, tmp_path: Path) -> None:
    """The documented single-machine default: N processes give a caller N bursts."""
    cluster.database_url = f"sqlite:///{tmp_path / 'shared.db'}"
    upgrade_to_head(cluster.database_url)
    apis = [cluster.api(f"lite{i}", **LIMITS) for i in range(3)]

    answers = burst(cluster, apis)

    assert sum(a.status_code == 202 for _, a in answers) == 3 * BURST
