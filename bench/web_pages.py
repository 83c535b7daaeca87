"""Server-side render time of each web console page on a seeded ledger.

    cd backend
    .venv/bin/python ../bench/seed_usage.py --db sqlite:///data/bench-usage.db --rows 1000000
    .venv/bin/python ../bench/web_pages.py --db sqlite:///data/bench-usage.db

``seed_usage.py`` writes the usage rows and their rollups (tasks of 10-70 calls over 90 days,
1,000 users); this script adds the ``tasks`` rows the console lists: one per task of the ledger
(as its user, finished on its day) and, up to ``--tasks``, older tasks without calls, in the
statuses a busy service has (``INSERT`` in batches; skipped when the table is already that big).

Each page is requested ``--requests`` times through the real application in process
(``httpx.AsyncClient`` over ``ASGITransport``: routing, the principal, the queries, the template,
the bytes of the page), as an administrator and, for the pages a user sees differently, as one
of the seeded users; p50/p95/max wall time. An administrator's everyone-wide figures of ended
days are kept for a minute (``app/web/cache.py``): those pages are also timed with nothing kept
("not kept"), as the first view after that minute is. Authentication is not measured (the console's
principal is given, as ``bench/usage_endpoints.py`` gives the API's).

Results go to stdout (a Markdown table) and to ``bench/results/web-<dialect>-<rows>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from fastapi import Request
from sqlalchemy import func, select

BACKEND = Path(__file__).resolve().parents[1] / "backend"
sys.path.insert(0, str(BACKEND))

from seed_usage import bench_settings, ledger_facts, seed_tasks, summary_ms  # noqa: E402

from app.access.principal import Principal  # noqa: E402
from app.core.runtime import Runtime  # noqa: E402
from app.main import create_app  # noqa: E402
from app.models import LLMUsage, UsageRollupDaily  # noqa: E402
from app.web.cache import ClosedDaysCache  # noqa: E402
from app.web.session import console_principal  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


async def time_pages(
    client: httpx.AsyncClient,
    paths: list[str],
    warmup: int = 2,
    before_each: Callable[[], None] | None = None,
) -> list[float]:
    for path in paths[:warmup]:
        (await client.get(path)).raise_for_status()
    timings = []
    for path in paths:
        if before_each is not None:
            before_each()
        start = time.perf_counter()
        response = await client.get(path)
        timings.append(time.perf_counter() - start)
        response.raise_for_status()
    return timings


async def bench(url: str, tasks: int, requests: int, seed: int) -> dict[str, Any]:
    settings = bench_settings(url)
    runtime = Runtime.build(settings, start_background=False)
    seeded = seed_tasks(runtime.engine, tasks, seed)
    facts = ledger_facts(runtime.engine)
    with runtime.engine.connect() as conn:
        # A task of the last days with calls, and its user (a user with recent spend).
        task_id, user_id = conn.execute(
            select(UsageRollupDaily.task_id, UsageRollupDaily.user_id)
            .where(UsageRollupDaily.task_id != "")
            .order_by(UsageRollupDaily.day.desc(), UsageRollupDaily.task_id)
            .limit(1)
        ).one()
        calls = conn.execute(
            select(func.count()).select_from(LLMUsage).where(LLMUsage.task_id == task_id)
        ).scalar_one()
    app = create_app(settings)
    app.state.runtime = runtime  # the lifespan's job, minus the worker, telemetry and access
    principal = Principal("bench-admin", "admin")

    def as_principal(request: Request) -> Principal:
        request.state.principal = principal
        return principal

    app.dependency_overrides[console_principal] = as_principal
    today = datetime.now(UTC).date()
    quarter = (today - timedelta(days=89)).isoformat()
    admin_pages = {
        "overview /": "/",
        "tasks /tasks": "/tasks",
        "tasks, page 1000": "/tasks?page=1000",
        "tasks, status=failed": "/tasks?status=failed",
        "tasks, one user": f"/tasks?user={user_id}",
        "tasks, repo contains": "/tasks?repo=project-7.git",
        "tasks, rows fragment": "/tasks/rows",
        f"task page ({calls} calls)": f"/tasks/{task_id}",
        "task detail fragment": f"/tasks/{task_id}/live?part=detail",
        "submit form": "/tasks/new?example=1",
        "usage by day, 30 d": "/usage?group_by=day",
        "usage by model, 30 d": "/usage?group_by=model",
        "usage by agent, 30 d": "/usage?group_by=agent",
        "usage by provider, 30 d": "/usage?group_by=provider",
        "usage by operation, 30 d": "/usage?group_by=operation",
        "usage by user, 30 d": "/usage?group_by=user",
        "usage by user, 90 d": f"/usage?group_by=user&since={quarter}",
        "usage table CSV, by user": "/usage/table.csv?group_by=user",
        "budgets": f"/budgets?user={user_id}",
        "API keys": "/keys",
    }
    cold_pages = {
        "overview /, ended days not kept": "/",
        "usage by user, 30 d, not kept": "/usage?group_by=user",
        "usage by user, 90 d, not kept": f"/usage?group_by=user&since={quarter}",
    }
    user_pages = {
        "overview / (user)": "/",
        "tasks /tasks (user)": "/tasks",
        "usage by model, 30 d (user)": "/usage?group_by=model",
        f"task page ({calls} calls, user)": f"/tasks/{task_id}",
    }
    result: dict[str, Any] = {
        "database": runtime.engine.dialect.name,
        **facts,
        **seeded,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "pages": {},
    }
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))

    def forget_ended_days() -> None:
        state = app.state.console
        app.state.console = dataclasses.replace(state, closed_days=ClosedDaysCache())

    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        for name, path in admin_pages.items():
            result["pages"][name] = summary_ms(await time_pages(client, [path] * requests), 1)
            print(f"{name:36} {result['pages'][name]}", flush=True)
        # The everyone-wide pages keep the figures of ended days for a minute (app/web/cache.py):
        # the same pages with nothing kept, as the first view after that minute sees them.
        for name, path in cold_pages.items():
            timings = await time_pages(client, [path] * requests, before_each=forget_ended_days)
            result["pages"][name] = summary_ms(timings, 1)
            print(f"{name:36} {result['pages'][name]}", flush=True)
        principal = Principal(user_id, "user")
        for name, path in user_pages.items():
            result["pages"][name] = summary_ms(await time_pages(client, [path] * requests), 1)
            print(f"{name:36} {result['pages'][name]}", flush=True)
    runtime.close()
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"{result['database']}: {result['llm_usage_rows']:,} usage rows, "
        f"{result['usage_rollup_daily_rows']:,} per-task / "
        f"{result['usage_rollup_user_daily_rows']:,} per-user rollup rows, "
        f"{result['tasks_rows']:,} tasks",
        "",
        "| Page (HTTP, in process) | n | p50 ms | p95 ms | max ms |",
        "|---|---|---|---|---|",
    ]
    for name, s in result["pages"].items():
        lines.append(f"| {name} | {s['n']} | {s['p50_ms']} | {s['p95_ms']} | {s['max_ms']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--tasks", type=int, default=100_000, help="tasks rows to have")
    parser.add_argument("--requests", type=int, default=20, help="requests per page")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--out", type=Path, help="where the JSON goes (default bench/results/web-<db>-<rows>.json)"
    )
    args = parser.parse_args()
    result = asyncio.run(bench(args.db, args.tasks, args.requests, args.seed))
    RESULTS.mkdir(exist_ok=True)
    out = args.out or RESULTS / f"web-{result['database']}-{result['llm_usage_rows']}.json"
    out.write_text(json.dumps(result, indent=2))
    print()
    print(markdown(result))
    print(f"\n(saved {out})")


if __name__ == "__main__":
    main()
