"""Latency of the usage endpoints on a seeded ledger, and of the same answers from raw rows.

    cd backend
    .venv/bin/python ../bench/seed_usage.py --db sqlite:///data/bench-usage.db --rows 1000000
    .venv/bin/python ../bench/usage_endpoints.py --db sqlite:///data/bench-usage.db

1. HTTP: each endpoint is called ``--requests`` times through the real application in process
   (``httpx.AsyncClient`` over ``ASGITransport``: routing, validation, the session, the query,
   the response model and JSON), a different task or user each time; p50/p95/max wall time.
2. Rollup vs raw: the same report is computed by the service from the rollup and from the raw
   ``llm_usage`` (or ``task_metrics``) rows (``source="raw"``), timed in the same run; the two
   answers must agree (exact but for float rounding of latency sums; the task metrics report's
   duration percentiles, histogram estimates on the rollup, are reported side by side instead),
   and the ratio of medians is reported.

Results go to stdout (a Markdown table) and to ``bench/results/usage-<dialect>-<rows>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.orm import Session

BACKEND = Path(__file__).resolve().parents[1] / "backend"
sys.path.insert(0, str(BACKEND))

from seed_usage import bench_settings, ledger_facts, summary_ms  # noqa: E402

from app.api.auth import Principal, current_principal  # noqa: E402
from app.core.runtime import Runtime  # noqa: E402
from app.main import create_app  # noqa: E402
from app.usage.report import (  # noqa: E402
    Source,
    overall_usage,
    task_usage,
    usage_window,
    user_usage,
)
from app.usage.task_metrics import task_metrics  # noqa: E402

ADMIN = Principal("bench", "admin")
RESULTS = Path(__file__).resolve().parent / "results"


PERCENTILES = ("p50", "p90", "p95", "p99")


def split_estimates(answer: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float | None]]:
    """The task metrics report's duration percentiles are histogram estimates on the rollup and
    exact on the raw rows: set them apart so the rest can be compared exactly."""
    durations = answer.get("duration_seconds")
    if durations is None:
        return answer, {}
    rest = {k: v for k, v in durations.items() if k not in PERCENTILES}
    return {**answer, "duration_seconds": rest}, {k: durations[k] for k in PERCENTILES}


def same(a: Any, b: Any) -> bool:
    """Equal, except floats to 1e-9 relative (sums of latencies in a different order)."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1.0)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


async def time_http(client: httpx.AsyncClient, paths: list[str], warmup: int = 5) -> list[float]:
    for path in paths[:warmup]:
        (await client.get(path)).raise_for_status()
    timings = []
    for path in paths:
        start = time.perf_counter()
        response = await client.get(path)
        timings.append(time.perf_counter() - start)
        response.raise_for_status()
    return timings


def time_service(
    runtime: Runtime, call: Callable[[Session, Source], Any], source: Source, repeats: int
) -> tuple[list[float], Any]:
    timings, answer = [], None
    for _ in range(repeats):
        with runtime.session_factory() as session:
            start = time.perf_counter()
            answer = call(session, source).model_dump()
            timings.append(time.perf_counter() - start)
    return timings, answer


async def bench(url: str, requests: int, raw_repeats: int, seed: int) -> dict[str, Any]:
    settings = bench_settings(url)
    runtime = Runtime.build(settings, start_background=False)
    app = create_app(settings)
    app.state.runtime = runtime  # the lifespan's job, minus the worker and telemetry
    app.dependency_overrides[current_principal] = lambda: ADMIN  # authentication not measured
    rng = random.Random(seed)
    facts = ledger_facts(runtime.engine)
    tasks, users = facts["tasks"], facts["users"]
    task_ids = [f"task-{rng.randint(1, tasks):08d}" for _ in range(requests)]
    user_ids = [f"user-{rng.randrange(users):05d}" for _ in range(requests)]
    endpoints = {
        "GET /usage/task/{id}": [f"/api/v1/usage/task/{t}" for t in task_ids],
        "GET /usage/user/{id}?days=30": [f"/api/v1/usage/user/{u}?days=30" for u in user_ids],
        "GET /usage/overall?days=7": ["/api/v1/usage/overall?days=7"] * requests,
        "GET /usage/overall?days=30": ["/api/v1/usage/overall?days=30"] * requests,
        "GET /usage/metrics/tasks?days=7": ["/api/v1/usage/metrics/tasks?days=7"] * requests,
    }
    result: dict[str, Any] = {
        "database": runtime.engine.dialect.name,
        **facts,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "http": {},
        "rollup_vs_raw": {},
    }
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        for name, paths in endpoints.items():
            result["http"][name] = summary_ms(await time_http(client, paths))
            print(f"{name:36} {result['http'][name]}", flush=True)

    now = datetime.now(UTC)
    week, month = usage_window(7, now), usage_window(30, now)
    reports: dict[str, Callable[[Session, Source], Any]] = {
        "task": lambda s, src: task_usage(s, ADMIN, task_ids[0], source=src),
        "user, 30 days": lambda s, src: user_usage(s, ADMIN, user_ids[0], month, source=src),
        "overall, 7 days": lambda s, src: overall_usage(s, week, source=src),
        "overall, 30 days": lambda s, src: overall_usage(s, month, source=src),
        "task metrics, 7 days": lambda s, src: task_metrics(s, week, source=src),
    }
    for name, call in reports.items():
        rollup_t, rollup_answer = time_service(runtime, call, "rollup", max(raw_repeats, 5))
        raw_t, raw_answer = time_service(runtime, call, "raw", raw_repeats)
        rollup_rest, estimated = split_estimates(rollup_answer)
        raw_rest, exact = split_estimates(raw_answer)
        entry = {
            "rollup": summary_ms(rollup_t),
            "raw": summary_ms(raw_t),
            "ratio_of_medians": round(statistics.median(raw_t) / statistics.median(rollup_t), 1),
            "answers_agree": same(rollup_rest, raw_rest),
        }
        if estimated:
            entry["duration_percentiles"] = {"rollup_estimate": estimated, "raw_exact": exact}
        result["rollup_vs_raw"][name] = entry
        print(f"{name:36} {entry}", flush=True)
    runtime.close()
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"{result['database']}: {result['llm_usage_rows']:,} usage rows, "
        f"{result['usage_rollup_daily_rows']:,} per-task / "
        f"{result['usage_rollup_user_daily_rows']:,} per-user / "
        f"{result['usage_rollup_daily_overall_rows']:,} overall rollup rows, "
        f"{result['tasks']:,} tasks, {result['users']:,} users",
        "",
        "| Endpoint (HTTP, in process) | n | p50 ms | p95 ms | max ms |",
        "|---|---|---|---|---|",
    ]
    for name, s in result["http"].items():
        lines.append(f"| `{name}` | {s['n']} | {s['p50_ms']} | {s['p95_ms']} | {s['max_ms']} |")
    lines += [
        "",
        "| Report (service) | rollup p50 ms | raw rows p50 ms | raw / rollup | same answer |",
        "|---|---|---|---|---|",
    ]
    for name, e in result["rollup_vs_raw"].items():
        lines.append(
            f"| {name} | {e['rollup']['p50_ms']} | {e['raw']['p50_ms']} | "
            f"{e['ratio_of_medians']}x | {'yes' if e['answers_agree'] else 'NO'} |"
        )
    for name, e in result["rollup_vs_raw"].items():
        if "duration_percentiles" in e:
            est, exact = (e["duration_percentiles"][k] for k in ("rollup_estimate", "raw_exact"))
            lines.append(
                f"\n{name}, duration p50/p90/p95/p99 s: rollup estimate "
                + " / ".join(f"{est[p]:.1f}" for p in PERCENTILES if est[p] is not None)
                + ", exact "
                + " / ".join(f"{exact[p]:.1f}" for p in PERCENTILES if exact[p] is not None)
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--raw-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    result = asyncio.run(bench(args.db, args.requests, args.raw_repeats, args.seed))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"usage-{result['database']}-{result['llm_usage_rows']}.json"
    out.write_text(json.dumps(result, indent=2))
    print()
    print(markdown(result))
    print(f"\n(saved {out})")


if __name__ == "__main__":
    main()
