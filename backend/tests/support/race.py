"""One worker process of the budget race (scenario 6): its own ``Runtime``, many calls at once.

``race_worker`` runs in a child process (forked from the suite's preloaded forkserver). It builds
the service's runtime from the environment it is given, waits at a barrier shared with the other
workers, then starts all of its calls at once through ``AsyncLLMClient`` and reports each call's
outcome over a pipe: ``"ok"``, ``"blocked"`` (the budget refused it) or the error's type name.
"""

from __future__ import annotations

import asyncio
import os
from multiprocessing.connection import Connection
from typing import Any

import anyio.to_thread

from app.core.config import Settings
from app.core.errors import BudgetExceededError
from app.core.runtime import Runtime
from app.tracking.llm_client import AsyncLLMClient


def race_worker(
    env: dict[str, str],
    calls: list[dict[str, Any]],
    model: str,
    max_tokens: int,
    db_threads: int,
    barrier: Any,
    conn: Connection,
) -> None:
    os.environ.clear()
    os.environ.update(env)
    runtime = Runtime.build(Settings(), start_background=False)
    try:
        barrier.wait(timeout=120)
        conn.send(asyncio.run(_race(runtime, calls, model, max_tokens, db_threads)))
    finally:
        runtime.close()
        conn.close()


async def _race(
    runtime: Runtime, calls: list[dict[str, Any]], model: str, max_tokens: int, db_threads: int
) -> list[str]:
    # Tracking and budget work runs in worker threads, one database connection each: bounded so
    # that the workers together stay well inside PostgreSQL's max_connections.
    anyio.to_thread.current_default_thread_limiter().total_tokens = db_threads

    async def one(spec: dict[str, Any]) -> str:
        client = AsyncLLMClient(
            task_id=spec["key"], user_id=spec["user"], agent="FixAgent", runtime=runtime
        )
        messages = [{"role": "user", "content": f"[{spec['kind']}] [{spec['key']}] race"}]
        try:
            await client.chat_completion(messages, model, max_tokens=max_tokens)
        except BudgetExceededError:
            return "blocked"
        except Exception as exc:
            return type(exc).__name__
        return "ok"

    return list(await asyncio.gather(*(one(spec) for spec in calls)))
