"""Per-call overhead of LLMClient against the raw openai SDK, both calling the same local
simulator in one run: sequential, and 100 concurrent async callers.

The tracked call writes its row durably (SQLite in WAL mode, committed before the call returns)
and updates metrics and a span; the raw call does none of that. Calls alternate between the two
so drift on a noisy machine hits both equally; the figure that matters is the difference.

    cd backend && .venv/bin/python ../bench/llm_overhead.py [--calls 2000] [--concurrency 100]

``--compare-writers`` runs concurrent rounds only: raw, rows committed by the tracking thread
(``TRACKING_WRITER=thread``) and by the writer process (``process``, the default), in turn;
``--pin`` adds: this process on one CPU, the simulator and the writer process on the other.

Once its runtimes are up, this process freezes its start-up heap as the service does when it is
ready (``app.core.heap``); ``--no-freeze`` leaves it to every full collection, as before.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx2
import openai

from app.core.config import Settings
from app.core.migrations import upgrade_to_head
from app.core.runtime import Runtime
from app.tracking.llm_client import AsyncLLMClient, LLMClient

MESSAGES = [{"role": "user", "content": "Reply with one short sentence."}]
MODEL = "gpt-4o-mini"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(raw: list[float], tracked: list[float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, q in (("p50", 0.50), ("p99", 0.99)):
        r, t = pct(raw, q), pct(tracked, q)
        out[f"raw_{name}_ms"] = round(r, 3)
        out[f"tracked_{name}_ms"] = round(t, 3)
        out[f"added_{name}_ms"] = round(t - r, 3)
        out[f"ratio_{name}"] = round(t / r, 3)
    out["raw_mean_ms"] = round(statistics.fmean(raw), 3)
    out["tracked_mean_ms"] = round(statistics.fmean(tracked), 3)
    return out


def sequential(runtime: Runtime, raw: openai.OpenAI, calls: int) -> dict[str, float]:
    client = LLMClient(task_id="bench", user_id="bench", agent="bench", runtime=runtime)
    raw_ms: list[float] = []
    tracked_ms: list[float] = []
    for i in range(calls * 2 + 100):
        use_tracked = i % 2 == 1
        started = time.perf_counter()
        if use_tracked:
            client.chat_completion(messages=MESSAGES, model=MODEL)
        else:
            raw.chat.completions.create(messages=MESSAGES, model=MODEL)  # type: ignore[arg-type]
        elapsed = (time.perf_counter() - started) * 1000
        if i >= 100:  # warm-up excluded
            (tracked_ms if use_tracked else raw_ms).append(elapsed)
    return summary(raw_ms, tracked_ms)


async def concurrent(
    runtime: Runtime, raw: openai.AsyncOpenAI, concurrency: int, rounds: int
) -> dict[str, float]:
    """Rounds of ``concurrency`` chat completions gathered at once, raw and tracked alternately.

    Both are bound by the client's CPU here (100 SDK calls take ~0.3 s of Python on this
    machine), so any CPU tracking adds to a call shows up in every call of the round behind it;
    ``added_per_call_ms`` (the difference of round wall times, over the calls) is the cost.
    """
    client = AsyncLLMClient(task_id="bench", user_id="bench", agent="bench", runtime=runtime)

    async def raw_call() -> Any:
        return await raw.chat.completions.create(messages=MESSAGES, model=MODEL)  # type: ignore[arg-type]

    async def tracked_call() -> Any:
        return await client.chat_completion(messages=MESSAGES, model=MODEL)

    return await concurrent_rounds((raw_call, tracked_call), concurrency, rounds)


async def concurrent_rounds(
    calls: tuple[Callable[[], Awaitable[Any]], ...], concurrency: int, rounds: int
) -> dict[str, float]:
    """``calls`` is (raw, tracked): rounds of ``concurrency`` of each gathered at once, in turn,
    after one warm-up round of each."""
    raw_ms: list[float] = []
    tracked_ms: list[float] = []
    walls: dict[bool, list[float]] = {False: [], True: []}

    async def one(tracked: bool, sink: list[float]) -> None:
        started = time.perf_counter()
        await calls[tracked]()
        sink.append((time.perf_counter() - started) * 1000)

    for r in range(rounds + 1):
        for tracked in (False, True):
            sink: list[float] = [] if r == 0 else (tracked_ms if tracked else raw_ms)
            started = time.perf_counter()
            await asyncio.gather(*(one(tracked, sink) for _ in range(concurrency)))
            if r > 0:
                walls[tracked].append((time.perf_counter() - started) * 1000)
    out = summary(raw_ms, tracked_ms)
    raw_wall, tracked_wall = statistics.median(walls[False]), statistics.median(walls[True])
    out["raw_round_ms"] = round(raw_wall, 3)
    out["tracked_round_ms"] = round(tracked_wall, 3)
    out["added_per_call_ms"] = round((tracked_wall - raw_wall) / concurrency, 3)
    # Throughput: calls completed per second by a round of ``concurrency`` callers.
    out["raw_calls_per_s"] = round(concurrency / raw_wall * 1000, 1)
    out["tracked_calls_per_s"] = round(concurrency / tracked_wall * 1000, 1)
    out["tracked_vs_raw_throughput"] = round(raw_wall / tracked_wall, 3)
    return out


async def concurrent_writers(
    runtimes: dict[str, Runtime], raw: openai.AsyncOpenAI, concurrency: int, rounds: int
) -> dict[str, Any]:
    """Rounds of ``concurrency`` calls, raw and then tracked by each runtime (one per
    ``TRACKING_WRITER``), in turn, after one warm-up round of each: each writer's throughput
    against the raw rounds of the same run."""
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "raw": lambda: raw.chat.completions.create(messages=MESSAGES, model=MODEL)  # type: ignore[arg-type]
    }
    for name, runtime in runtimes.items():
        client = AsyncLLMClient(task_id="bench", user_id="bench", agent="bench", runtime=runtime)
        calls[name] = functools.partial(client.chat_completion, messages=MESSAGES, model=MODEL)
    walls: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(rounds + 1):
        for name, call in calls.items():
            started = time.perf_counter()
            await asyncio.gather(*(call() for _ in range(concurrency)))
            if r > 0:
                walls[name].append((time.perf_counter() - started) * 1000)
    raw_wall = statistics.median(walls["raw"])
    out: dict[str, Any] = {"raw_round_ms": round(raw_wall, 3)}
    for name in runtimes:
        wall = statistics.median(walls[name])
        out[name] = {
            "round_ms": round(wall, 3),
            "added_per_call_ms": round((wall - raw_wall) / concurrency, 3),
            "tracked_vs_raw_throughput": round(raw_wall / wall, 3),
        }
    return out


@contextlib.contextmanager
def simulator_process(cpu: int | None = None) -> Iterator[str]:
    """The simulator in its own process, like a real provider: it does not share our GIL
    (nor, with ``cpu``, the caller's CPU: it runs on that one only)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.simulator", "--port", str(port), "--log-level", "warning"]
    )
    if cpu is not None:
        os.sched_setaffinity(proc.pid, {cpu})
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx2.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx2.HTTPError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def bench_runtime(url: str, base_url: str, scratch: Path, **overrides: Any) -> Runtime:
    """The service runtime the benchmarks track calls with: ``url`` migrated, the simulator at
    ``base_url``, the SDK's default retries (as the raw clients), background jobs off."""
    upgrade_to_head(url)
    settings = Settings(
        database_url=url,
        openai_api_key="sk-bench",  # type: ignore[arg-type]
        openai_base_url=base_url,
        spool_dir=scratch / "spool",
        openai_max_retries=2,  # the SDK default; both clients alike
        **overrides,
    )
    return Runtime.build(settings, start_background=False)


def raw_clients(base_url: str) -> tuple[openai.OpenAI, openai.AsyncOpenAI]:
    """The raw SDK clients the tracked calls are compared with (the runtime's pool limits)."""
    limits = httpx2.Limits(max_connections=200, max_keepalive_connections=100)
    raw = openai.OpenAI(
        api_key="sk-bench",
        base_url=base_url,
        max_retries=2,
        http_client=httpx2.Client(limits=limits),
    )
    raw_async = openai.AsyncOpenAI(
        api_key="sk-bench",
        base_url=base_url,
        max_retries=2,
        http_client=httpx2.AsyncClient(limits=limits),
    )
    return raw, raw_async


def freeze_heap(args: argparse.Namespace) -> bool:
    """Freeze the start-up heap as the service does once ready, unless ``--no-freeze``; False
    also for a tree from before ``app.core.heap`` (``run_tree.py`` runs older trees)."""
    if args.no_freeze:
        return False
    try:
        from app.core.heap import freeze_startup_heap
    except ImportError:
        return False
    return freeze_startup_heap()


def pinned_cpus() -> tuple[int, int]:
    """``--pin``: the calling process on the first CPU it may use, the simulator and the writer
    process on the second. The caller's CPU is then the benchmark's only contended resource: the
    rounds measure what tracking costs the process that makes the calls, and two runs vary less
    (the scheduler no longer moves the three processes across the two CPUs)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs two CPUs")
    return cpus[0], cpus[1]


def compare_writers(args: argparse.Namespace) -> dict[str, Any]:
    """The two ``TRACKING_WRITER`` settings side by side in one run (ratios hold on a noisy
    machine where absolute times do not)."""
    limited = ("task_max", "user_daily", "user_monthly", "global_daily") if args.limits else ()
    cpus = pinned_cpus() if args.pin else None
    if cpus is not None:
        os.sched_setaffinity(0, {cpus[0]})  # before any thread starts: they inherit it
    others = cpus[1] if cpus is not None else None
    with tempfile.TemporaryDirectory() as tmp, simulator_process(others) as base_url:
        runtimes: dict[str, Runtime] = {}
        for writer in ("thread", "process"):
            scratch = Path(tmp) / writer
            scratch.mkdir()
            runtimes[writer] = bench_runtime(
                f"sqlite:///{scratch / 'bench.db'}",
                base_url,
                scratch,
                budget_enforcement=not args.no_budgets,
                tracking_writer=writer,
                **{f"budget_{scope}_usd": Decimal(1_000_000) for scope in limited},
            )
        process = runtimes["process"].db_worker.process
        if process is None or not process.start(wait=60):
            raise SystemExit("the writer process did not start")
        if others is not None and process.pid is not None:
            os.sched_setaffinity(process.pid, {others})
        _, raw_async = raw_clients(base_url)
        frozen = freeze_heap(args)
        results: dict[str, Any] = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "budgets": "off" if args.no_budgets else "all scopes limited" if args.limits else "on",
            "pinned": None if cpus is None else {"caller": cpus[0], "simulator_and_writer": others},
            "startup_heap_frozen": frozen,
            f"concurrent_{args.concurrency}": asyncio.run(
                concurrent_writers(runtimes, raw_async, args.concurrency, args.rounds)
            ),
            "load_average": os.getloadavg(),
        }
        rows = {}
        for writer, runtime in runtimes.items():
            with runtime.engine.connect() as conn:
                rows[writer] = conn.exec_driver_sql("SELECT count(*) FROM llm_usage").scalar()
            runtime.close()
        results["rows_written"] = rows
        results["rows_by_writer_process"] = process.acknowledged
        # (None for code before the event loop read them: ``run_tree.py`` runs older trees)
        results["ack_messages_read_on_the_event_loop"] = getattr(process, "loop_reads", None)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000, help="sequential calls of each kind")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20, help="concurrent rounds of each kind")
    parser.add_argument("--database-url", default=None, help="default: a fresh SQLite file")
    parser.add_argument("--concurrent-only", action="store_true", help="skip the sequential calls")
    budgets = parser.add_mutually_exclusive_group()
    budgets.add_argument(
        "--no-budgets", action="store_true", help="BUDGET_ENFORCEMENT=false: no reserve/settle"
    )
    budgets.add_argument(
        "--limits",
        action="store_true",
        help="a (never reached) limit on all four scopes: every call reserves and settles",
    )
    parser.add_argument(
        "--writer",
        choices=("process", "thread"),
        default="process",
        help="TRACKING_WRITER: who commits the async calls' rows",
    )
    parser.add_argument(
        "--compare-writers",
        action="store_true",
        help="concurrent rounds only: raw, thread-written and process-written rounds in turn",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="with --compare-writers: this process on one CPU, the simulator and writer on another",
    )
    parser.add_argument(
        "--no-freeze",
        action="store_true",
        help="leave the start-up heap to every full collection (the service freezes it)",
    )
    args = parser.parse_args()
    if args.pin and not args.compare_writers:
        parser.error("--pin goes with --compare-writers")
    if args.compare_writers:
        print(json.dumps(compare_writers(args), indent=2))
        return

    with tempfile.TemporaryDirectory() as tmp, simulator_process() as base_url:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        limited = ("task_max", "user_daily", "user_monthly", "global_daily") if args.limits else ()
        runtime = bench_runtime(
            url,
            base_url,
            Path(tmp),
            budget_enforcement=not args.no_budgets,
            tracking_writer=args.writer,
            **{f"budget_{scope}_usd": Decimal(1_000_000) for scope in limited},
        )
        raw, raw_async = raw_clients(base_url)
        if runtime.db_worker.process is not None:
            runtime.db_worker.process.start(wait=30)
        frozen = freeze_heap(args)
        results: dict[str, Any] = {
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "database": url.split("://")[0],
            "budgets": "off" if args.no_budgets else "all scopes limited" if args.limits else "on",
            "writer": args.writer,
            "startup_heap_frozen": frozen,
            "sequential": None if args.concurrent_only else sequential(runtime, raw, args.calls),
            f"concurrent_{args.concurrency}": asyncio.run(
                concurrent(runtime, raw_async, args.concurrency, args.rounds)
            ),
        }
        with runtime.engine.connect() as conn:
            results["rows_written"] = conn.exec_driver_sql(
                "SELECT count(*) FROM llm_usage"
            ).scalar()
        runtime.close()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
