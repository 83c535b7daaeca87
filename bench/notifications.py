"""Notifications and forecasts: the dispatcher's deliveries per second to a local receiver, and
the latency of ``GET /api/v1/usage/forecast``.

    cd backend
    .venv/bin/python ../bench/notifications.py [--db URL] [--events 2000] [--concurrency 4]
        [--users 200] [--requests 200]

1. Deliveries: ``--events`` events are recorded in the outbox, one webhook channel is subscribed
   to all of them, and one dispatcher (a thread, as in the service) delivers them to a
   ``ThreadingHTTPServer`` on loopback that verifies every signature; the figure is events
   delivered per second from the dispatcher's start to the last delivery recorded in the
   database, and the receiver's count of duplicates (0 expected: nothing was killed).
2. Forecast: daily rollups for ``--users`` users over 60 days (5 tasks x 2 models a day each)
   plus the overall rollup; the endpoint is called ``--requests`` times through the real
   application in process (ASGI) for a different user each time, and for everyone; p50/p95/max.

``--db``: a SQLAlchemy URL of an empty database (migrated here); default a temporary SQLite file.

3. Insights at scale (``--insights-db URL``, instead of 1 and 2): a database seeded by
   ``bench/seed_usage.py`` (e.g. 10M rows) gets a ``tasks`` row per task of its ledger
   (``seed_usage.seed_tasks``; 20 of them set running), then, through the application in
   process, ``--requests`` calls each of ``/usage/forecast``, ``/usage/anomalies`` (24 hours) and
   ``/usage/recommendations`` (30 days) for a different user each time, ``--everyone-requests``
   for everyone (no answer reused: cold), everyone's recommendations ``--requests`` times after
   the dispatcher's scan refreshed them (the cache), a running task's status (its projected
   cost); and one run of each dispatcher scan (anomalies, forecasts over budget, with a $50
   monthly budget for everyone).

    .venv/bin/python ../bench/seed_usage.py --db postgresql+psycopg://postgres@127.0.0.1:5432/b \
        --rows 10000000
    .venv/bin/python ../bench/notifications.py \
        --insights-db postgresql+psycopg://postgres@127.0.0.1:5432/b --requests 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, insert, select, update

BACKEND = Path(__file__).resolve().parents[1] / "backend"
sys.path.insert(0, str(BACKEND))

from seed_usage import seed_tasks  # noqa: E402 - the loader's tasks rows (bench/ is on sys.path)

from app.access.principal import Principal  # noqa: E402
from app.api.auth import current_principal  # noqa: E402
from app.core.config import Settings  # noqa: E402
from app.core.db import create_session_factory, transaction  # noqa: E402
from app.core.migrations import upgrade_to_head  # noqa: E402
from app.core.runtime import Runtime  # noqa: E402
from app.main import create_app  # noqa: E402
from app.models import (  # noqa: E402
    LLMUsage,
    Task,
    UsageRollupDaily,
    UsageRollupDailyOverall,
    UsageRollupUserDaily,
)
from app.notifications import service, store  # noqa: E402
from app.notifications.dispatcher import NotificationDispatcher  # noqa: E402
from app.notifications.events import Event, EventKind  # noqa: E402
from app.notifications.outbox import record_event  # noqa: E402
from app.notifications.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify  # noqa: E402
from app.schemas.notifications import ChannelCreate, SubscriptionCreate  # noqa: E402
from app.usage.anomalies import record_anomalies  # noqa: E402
from app.usage.forecast import record_forecasts_over_budget  # noqa: E402
from app.usage.insights import refresh_recommendations  # noqa: E402

SECRET = "whsec_bench-secret-0000000000000000"
ADMIN = Principal("bench", "admin")


def receiver() -> tuple[ThreadingHTTPServer, Counter[str], list[int]]:
    seen: Counter[str] = Counter()
    invalid = [0]
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a real receiver would offer

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            ok = verify(
                SECRET, self.headers.get(TIMESTAMP_HEADER), self.headers.get(SIGNATURE_HEADER), body
            )
            with lock:
                if ok:
                    seen[self.headers.get("ASA-Event-Id") or ""] += 1
                else:
                    invalid[0] += 1
            self.send_response(204 if ok else 401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen, invalid


def deliveries(runtime: Runtime, events: int) -> dict[str, Any]:
    server, seen, invalid = receiver()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    with transaction(create_session_factory(runtime.engine)) as session:
        channel = service.create_channel(
            session,
            ADMIN,
            ChannelCreate.model_validate(
                {
                    "name": "bench",
                    "target": {"kind": "webhook", "url": url, "signing_secret": SECRET},
                }
            ),
        )
        service.create_subscription(
            session,
            ADMIN,
            SubscriptionCreate(channel_id=channel.id, event_kind="*", all_users=True),
        )
    with runtime.engine.begin() as conn:
        for i in range(events):
            record_event(
                conn,
                Event(
                    id=f"task.finished:bench-{i}",
                    kind=EventKind.TASK_SUCCEEDED,
                    data={"task_id": f"bench-{i}", "status": "succeeded", "cost_usd": "0.01"},
                ),
            )
    dispatcher = NotificationDispatcher(runtime.engine, runtime.settings)
    started = time.perf_counter()
    dispatcher.start()
    try:
        while store.outbox_counts(runtime.engine).get("delivered", 0) < events:
            time.sleep(0.02)
            if time.perf_counter() - started > 600:
                raise TimeoutError("deliveries did not finish in 10 minutes")
        elapsed = time.perf_counter() - started
    finally:
        dispatcher.stop()
        server.shutdown()
    return {
        "events": events,
        "seconds": round(elapsed, 3),
        "deliveries_per_second": round(events / elapsed, 1),
        "received": sum(seen.values()),
        "duplicates": sum(n - 1 for n in seen.values() if n > 1),
        "invalid_signatures": invalid[0],
    }


def seed_rollups(runtime: Runtime, users: int, today: date) -> int:
    rows: list[dict[str, Any]] = []
    overall: dict[tuple[date, str], int] = {}
    per_user: dict[tuple[str, date, str], int] = {}
    for u in range(users):
        for d in range(60):
            day = today - timedelta(days=59 - d)
            for t in range(5):
                for model in ("gpt-4o-mini", "gpt-4o"):
                    cost = (1 + (u * 7 + d * 3 + t) % 11) * 10**9 * (5 if model == "gpt-4o" else 1)
                    rows.append(
                        {
                            "day": day,
                            "user_id": f"user-{u}",
                            "task_id": f"tsk-{u}-{d}-{t}",
                            "model": model,
                            "agent": "FixAgent",
                            "requests": 3,
                            "cost_pico_usd": cost,
                        }
                    )
                    overall[(day, model)] = overall.get((day, model), 0) + cost
                    key = (f"user-{u}", day, model)
                    per_user[key] = per_user.get(key, 0) + cost
    with runtime.engine.begin() as conn:
        for i in range(0, len(rows), 5000):
            conn.execute(insert(UsageRollupDaily), rows[i : i + 5000])
        # A user's forecast reads the per-user rollup the writer keeps beside the per-task one.
        users_rows = [
            {"user_id": user, "day": day, "model": model, "requests": 15, "cost_pico_usd": cost}
            for (user, day, model), cost in per_user.items()
        ]
        for i in range(0, len(users_rows), 5000):
            conn.execute(insert(UsageRollupUserDaily), users_rows[i : i + 5000])
        conn.execute(
            insert(UsageRollupDailyOverall),
            [
                {"day": day, "model": model, "agent": "FixAgent", "cost_pico_usd": cost}
                for (day, model), cost in overall.items()
            ],
        )
    return len(rows)


async def forecast_latency(runtime: Runtime, users: int, requests: int) -> dict[str, Any]:
    app = create_app(runtime.settings)
    app.state.runtime = runtime
    app.dependency_overrides[current_principal] = lambda: ADMIN
    transport = httpx.ASGITransport(app=app)
    results: dict[str, Any] = {}
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        for label, query in (("user", "user_id=user-{i}"), ("everyone", "everyone=true")):
            timings = []
            for i in range(requests):
                started = time.perf_counter()
                response = await client.get(f"/api/v1/usage/forecast?{query.format(i=i % users)}")
                timings.append((time.perf_counter() - started) * 1000)
                assert response.status_code == 200, response.text
            timings.sort()
            results[label] = {
                "p50_ms": round(statistics.median(timings), 1),
                "p95_ms": round(timings[int(0.95 * (len(timings) - 1))], 1),
                "max_ms": round(timings[-1], 1),
            }
    return results


def _summary(timings: list[float]) -> dict[str, float]:
    timings = sorted(timings)
    return {
        "p50_ms": round(statistics.median(timings), 1),
        "p95_ms": round(timings[int(0.95 * (len(timings) - 1))], 1),
        "max_ms": round(timings[-1], 1),
    }


async def _timed(runtime: Runtime, paths: list[str], requests: int) -> dict[str, float]:
    app = create_app(runtime.settings)
    app.state.runtime = runtime
    app.dependency_overrides[current_principal] = lambda: ADMIN
    transport = httpx.ASGITransport(app=app)
    timings = []
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        for i in range(requests):
            started = time.perf_counter()
            response = await client.get(paths[i % len(paths)])
            timings.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, response.text
    return _summary(timings)


async def insights_latency(
    cold: Runtime, warm: Runtime, requests: int, everyone_requests: int
) -> dict[str, Any]:
    """Each insight endpoint for one user at a time (``cold``: no answer reused), for everyone
    cold, and everyone's recommendations from the cache the dispatcher's scan fills (``warm``)."""
    with cold.engine.begin() as conn:
        users = [
            str(u)
            for u in conn.execute(
                select(Task.user_id).group_by(Task.user_id).order_by(func.count().desc())
            ).scalars()
        ]
        running = list(
            conn.execute(select(Task.id).order_by(Task.created_at.desc()).limit(20)).scalars()
        )
        conn.execute(update(Task).where(Task.id.in_(running)).values(status="running"))
    paths = {
        "forecast": "/api/v1/usage/forecast?{who}",
        "anomalies": "/api/v1/usage/anomalies?hours=24&{who}",
        "recommendations": "/api/v1/usage/recommendations?days=30&{who}",
    }
    results: dict[str, Any] = {"users": len(users)}
    for name, path in paths.items():
        per_user = [path.format(who=f"user_id={u}") for u in users[:requests]]
        results[f"{name} (one user)"] = await _timed(cold, per_user, requests)
        everyone = [path.format(who="everyone=true")]
        count = requests if name == "forecast" else everyone_requests
        results[f"{name} (everyone, cold)"] = await _timed(cold, everyone, count)
    started = time.perf_counter()
    refresh_recommendations(warm.engine, warm.settings, datetime.now(UTC))
    results["scan: refresh everyone's recommendations"] = {
        "ms": round((time.perf_counter() - started) * 1000, 1)
    }
    everyone = [paths["recommendations"].format(who="everyone=true")]
    results["recommendations (everyone, after the scan)"] = await _timed(warm, everyone, requests)
    status = [f"/api/v1/task/{task_id}" for task_id in running]
    results["task status with projection"] = await _timed(cold, status, requests)
    return results


def insights_scans(runtime: Runtime) -> dict[str, Any]:
    settings = runtime.settings.model_copy(update={"budget_user_monthly_usd": 50})
    found: dict[str, Any] = {}
    for name, scan in (("anomalies", record_anomalies),
                       ("forecasts_over_budget", record_forecasts_over_budget)):  # fmt: skip
        started = time.perf_counter()
        events = scan(runtime.engine, settings)
        found[f"scan {name}"] = {"ms": round((time.perf_counter() - started) * 1000, 1),
                                 "events": events}  # fmt: skip
    return found


def insights(url: str, requests: int, everyone_requests: int) -> dict[str, Any]:
    scratch = tempfile.TemporaryDirectory()
    upgrade_to_head(url)
    runtimes = [
        Runtime.build(
            Settings(
                database_url=url,
                openai_api_key="sk-bench-not-used",  # type: ignore[arg-type]
                openai_base_url="http://127.0.0.1:9/v1",
                spool_dir=Path(scratch.name) / "spool",
                auto_migrate=False,
                recommendation_cache_seconds=cache,
            ),
            start_background=False,
        )
        for cache in (0, 300)
    ]
    cold, warm = runtimes
    try:
        seeded = seed_tasks(cold.engine, 1, 42)
        with cold.engine.connect() as conn:
            rows = conn.scalar(select(func.count()).select_from(LLMUsage))
        report = {"database": cold.engine.dialect.name, "llm_usage_rows": rows, **seeded}
        report.update(asyncio.run(insights_latency(cold, warm, requests, everyone_requests)))
        report.update(insights_scans(cold))
    finally:
        for runtime in runtimes:
            runtime.close()
        scratch.cleanup()
    report["machine"] = f"{platform.machine()} {platform.system()}, {platform.python_version()}"
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="an empty database (default: a temporary SQLite file)")
    parser.add_argument("--insights-db", help="a database seeded by seed_usage.py (part 3)")
    parser.add_argument("--everyone-requests", type=int, default=3, help="part 3, cold")
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    if args.insights_db:
        report = insights(args.insights_db, args.requests, args.everyone_requests)
        print(json.dumps(report, indent=2))
        return
    scratch = tempfile.TemporaryDirectory()
    url = args.db or f"sqlite:///{scratch.name}/bench-notifications.db"
    upgrade_to_head(url)
    settings = Settings(
        database_url=url,
        openai_api_key="sk-bench-not-used",  # type: ignore[arg-type]
        openai_base_url="http://127.0.0.1:9/v1",
        spool_dir=Path(scratch.name) / "spool",
        auto_migrate=False,
        notification_batch_size=100,
        notification_concurrency=args.concurrency,
        notification_poll_interval_seconds=0.05,
    )
    runtime = Runtime.build(settings, start_background=False)
    try:
        delivered = deliveries(runtime, args.events)
        rows = seed_rollups(runtime, args.users, datetime.now(UTC).date())
        latency = asyncio.run(forecast_latency(runtime, args.users, args.requests))
    finally:
        runtime.close()
        scratch.cleanup()
    report = {
        "database": runtime.engine.dialect.name,
        "machine": f"{platform.machine()} {platform.system()}, {platform.python_version()}",
        "concurrency": args.concurrency,
        "deliveries": delivered,
        "rollup_rows": rows,
        "forecast": latency,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
