"""Load on a running ASA service: the usage endpoints and task submission, over loopback HTTP.

    make run                                   # in one shell (or any service URL), then:
    cd backend
    .venv/bin/python ../bench/load_api.py --url http://127.0.0.1:8000 --seconds 60 \
        --concurrency 32 --pid "$(pgrep -f 'uvicorn app.main')"

``--concurrency`` async clients (one ``httpx.AsyncClient``, keep-alive) loop for ``--seconds``,
each request an operation drawn by weight from ``OPERATIONS``: the task, user and overall usage
reports, the task metrics, and task submission (a real task on ``--repo-url``, which the
service's worker then runs). Submissions need the per-key rate limit off on the service
(``TASK_SUBMIT_RATE_PER_MINUTE=0``), or they count as errors (429).

Reported (stdout, JSON): requests, throughput, p50/p99/max latency overall and per operation,
errors (any status but 2xx, or a transport error) with their kinds, the ids of the tasks
accepted, and with ``--pid`` the service's CPU time per request and its resident memory before
and after. The reliability
suite (``tests/reliability/test_rel_load.py``) runs ``run_load`` against its own service.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx

BACKEND = Path(__file__).resolve().parents[1] / "backend"
DEFAULT_REPO = BACKEND / "data" / "examples" / "buggy-calculator"
# name: (weight, method, path template)
OPERATIONS: dict[str, tuple[int, str, str]] = {
    "GET /usage/task/{id}": (30, "GET", "/api/v1/usage/task/{task_id}"),
    "GET /usage/user/{id}?days=30": (25, "GET", "/api/v1/usage/user/{user_id}?days=30"),
    "GET /usage/overall?days=7": (20, "GET", "/api/v1/usage/overall?days=7"),
    "GET /usage/metrics/tasks?days=7": (15, "GET", "/api/v1/usage/metrics/tasks?days=7"),
    "POST /task/submit": (10, "POST", "/api/v1/task/submit"),
}


def rss_mib(pid: int | None) -> float | None:
    """Resident memory of a process (``VmRSS``), MiB; None without a pid."""
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system) a process has used, from ``/proc/<pid>/stat``; None without a pid.

    On a shared machine throughput depends on what else runs; CPU per request does not."""
    if pid is None:
        return None
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_summary(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {"n": 0}
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 0.50), 2),
        "p99_ms": round(percentile(ms, 0.99), 2),
        "max_ms": round(max(ms), 2),
    }


async def discover_task_ids(client: httpx.AsyncClient) -> list[str]:
    """Ids of finished tasks (they have usage), for the task report when none are given."""
    ids: list[str] = []
    for status in ("succeeded", "failed", "error", "budget_exceeded"):
        page = (await client.get("/api/v1/task", params={"status": status, "limit": 200})).json()
        ids.extend(item["task_id"] for item in page.get("items", []))
    return ids


async def run_load(
    url: str,
    *,
    seconds: float,
    concurrency: int,
    repo_url: str,
    task_ids: list[str] | None = None,
    user_id: str = "local",
    pid: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Drive the service at ``url`` for ``seconds``; the figures, as ``main`` prints them."""
    rng = random.Random(seed)
    # Idle connections are dropped before uvicorn's 5 s keep-alive timeout would close them
    # under a request in flight (a ReadError that is the client's race, not the service's).
    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=2.0
    )
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        ids = list(task_ids or []) or await discover_task_ids(client)
        operations = {
            name: spec for name, spec in OPERATIONS.items() if ids or "{task_id}" not in spec[2]
        }
        names = list(operations)
        weights = [operations[n][0] for n in names]
        timings: dict[str, list[float]] = defaultdict(list)
        errors: Counter[str] = Counter()  # "<operation>: <status or exception>"
        unanswered = 0
        accepted: list[str] = []
        body = {
            "repo_url": repo_url,
            "bug_description": "average() in calculator.py is wrong: average([2, 4, 6]) is 4",
            "test_command": "python3 -m unittest -v",
        }
        rss_before = rss_mib(pid)
        cpu_before = cpu_seconds(pid)
        started = time.monotonic()
        deadline = started + seconds

        async def worker() -> None:
            nonlocal unanswered
            while time.monotonic() < deadline:
                name = rng.choices(names, weights)[0]
                _weight, method, template = operations[name]
                path = template.format(task_id=rng.choice(ids) if ids else "", user_id=user_id)
                sent = time.perf_counter()
                try:
                    if method == "POST":
                        response = await client.post(path, json=body)
                    else:
                        response = await client.get(path)
                except httpx.HTTPError as exc:
                    errors[f"{name}: {type(exc).__name__}"] += 1
                    unanswered += 1
                    continue
                timings[name].append(time.perf_counter() - sent)
                if not 200 <= response.status_code < 300:
                    errors[f"{name}: {response.status_code}"] += 1
                elif method == "POST":
                    accepted.append(response.json()["task_id"])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
        rss_after = rss_mib(pid)
        cpu_after = cpu_seconds(pid)
    every = [s for values in timings.values() for s in values]
    return {
        "seconds": round(elapsed, 2),
        "concurrency": concurrency,
        "requests": len(every) + unanswered,
        "throughput_rps": round(len(every) / elapsed, 1),
        "latency": latency_summary(every),
        "by_operation": {name: latency_summary(timings[name]) for name in names},
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "tasks_accepted": len(accepted),
        "accepted_task_ids": accepted,
        "service_cpu_ms_per_request": (
            round(1000 * (cpu_after - cpu_before) / max(len(every), 1), 2)
            if cpu_before is not None and cpu_after is not None
            else None
        ),
        "rss_before_mib": rss_before,
        "rss_after_mib": rss_after,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repo-url", default=str(DEFAULT_REPO))
    parser.add_argument("--task-id", action="append", default=[], help="for the task report")
    parser.add_argument("--user-id", default="local")
    parser.add_argument("--pid", type=int, default=None, help="the service's, for its memory")
    args = parser.parse_args()
    result = asyncio.run(
        run_load(
            args.url,
            seconds=args.seconds,
            concurrency=args.concurrency,
            repo_url=args.repo_url,
            task_ids=args.task_id,
            user_id=args.user_id,
            pid=args.pid,
        )
    )
    result.pop("accepted_task_ids")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
