"""Per-call overhead of LLMClient against the raw openai SDK for each tracked API, side by side:
chat completions (the reference), the Responses API (``responses.create``) and embeddings
(``embeddings.create``), all calling the same local simulator in its own process.

Same method as ``llm_overhead.py``: calls alternate raw / tracked so drift on a noisy machine
hits both alike; the tracked call commits its row (SQLite, WAL) before it returns. Sequential
calls, then rounds of ``--concurrency`` async calls gathered at once (added per call = the
difference of the rounds' median wall times over the calls).

    cd backend && .venv/bin/python ../bench/llm_overhead_apis.py [--calls 1000] [--rounds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
from llm_overhead import (
    bench_runtime,
    concurrent_rounds,
    raw_clients,
    simulator_process,
    summary,
)

from app.tracking.llm_client import AsyncLLMClient, LLMClient

MESSAGES = [{"role": "user", "content": "Reply with one short sentence."}]
CHAT_MODEL = "gpt-4o-mini"
EMBEDDING_MODEL = "text-embedding-3-small"
APIS = ("chat", "responses", "embeddings")


def sync_calls(api: str, raw: openai.OpenAI, tracked: LLMClient) -> tuple[Callable[[], Any], ...]:
    if api == "chat":
        return (
            lambda: raw.chat.completions.create(messages=MESSAGES, model=CHAT_MODEL),  # type: ignore[arg-type]
            lambda: tracked.chat.completions.create(messages=MESSAGES, model=CHAT_MODEL),
        )
    if api == "responses":
        return (
            lambda: raw.responses.create(model=CHAT_MODEL, input=MESSAGES[0]["content"]),
            lambda: tracked.responses.create(model=CHAT_MODEL, input=MESSAGES[0]["content"]),
        )
    return (
        lambda: raw.embeddings.create(model=EMBEDDING_MODEL, input="one short sentence"),
        lambda: tracked.embeddings.create(model=EMBEDDING_MODEL, input="one short sentence"),
    )


def async_calls(
    api: str, raw: openai.AsyncOpenAI, tracked: AsyncLLMClient
) -> tuple[Callable[[], Awaitable[Any]], ...]:
    if api == "chat":
        return (
            lambda: raw.chat.completions.create(messages=MESSAGES, model=CHAT_MODEL),  # type: ignore[arg-type]
            lambda: tracked.chat.completions.create(messages=MESSAGES, model=CHAT_MODEL),
        )
    if api == "responses":
        return (
            lambda: raw.responses.create(model=CHAT_MODEL, input=MESSAGES[0]["content"]),
            lambda: tracked.responses.create(model=CHAT_MODEL, input=MESSAGES[0]["content"]),
        )
    return (
        lambda: raw.embeddings.create(model=EMBEDDING_MODEL, input="one short sentence"),
        lambda: tracked.embeddings.create(model=EMBEDDING_MODEL, input="one short sentence"),
    )


def sequential(calls: tuple[Callable[[], Any], ...], count: int) -> dict[str, float]:
    raw_ms: list[float] = []
    tracked_ms: list[float] = []
    for i in range(count * 2 + 100):
        use_tracked = i % 2 == 1
        started = time.perf_counter()
        calls[use_tracked]()
        elapsed = (time.perf_counter() - started) * 1000
        if i >= 100:  # warm-up excluded
            (tracked_ms if use_tracked else raw_ms).append(elapsed)
    return summary(raw_ms, tracked_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=1000, help="sequential calls of each kind")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10, help="concurrent rounds of each kind")
    parser.add_argument("--apis", default=",".join(APIS), help="comma-separated: " + ",".join(APIS))
    args = parser.parse_args()
    apis = [api for api in args.apis.split(",") if api]

    with tempfile.TemporaryDirectory() as tmp, simulator_process() as base_url:
        runtime = bench_runtime(f"sqlite:///{Path(tmp) / 'bench.db'}", base_url, Path(tmp))
        raw, raw_async = raw_clients(base_url)
        tracked = LLMClient(task_id="bench", user_id="bench", agent="bench", runtime=runtime)
        tracked_async = AsyncLLMClient(
            task_id="bench", user_id="bench", agent="bench", runtime=runtime
        )
        results: dict[str, Any] = {
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "database": "sqlite",
        }
        for api in apis:
            results[api] = {"sequential": sequential(sync_calls(api, raw, tracked), args.calls)}

        async def all_concurrent() -> None:  # one event loop: the async clients live on it
            for api in apis:
                calls = async_calls(api, raw_async, tracked_async)
                results[api][f"concurrent_{args.concurrency}"] = await concurrent_rounds(
                    calls, args.concurrency, args.rounds
                )

        asyncio.run(all_concurrent())
        with runtime.engine.connect() as conn:
            results["rows_by_operation"] = dict(
                conn.exec_driver_sql(
                    "SELECT operation, count(*) FROM llm_usage GROUP BY operation"
                ).all()
            )
        runtime.close()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
