"""Microbenchmark of the Python a tracked async call runs on the event loop besides the SDK's:
preparing it, learning that no limit applies (``reserve_nowait``), building its outcome (usage,
price, record) from a canned response, and its Prometheus metrics; no HTTP, no database write.

Each figure is the best of three timed loops (µs a call). In a real round of 100 concurrent
calls the same code runs 2 to 4 times slower (colder caches between the SDK's calls); the loops
say what a change saves, ``llm_overhead.py`` what it is worth in throughput.

    cd backend && .venv/bin/python ../bench/call_pieces.py [--number 20000]

It uses only methods older trees have too, so ``run_tree.py`` compares before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from openai.types.chat import ChatCompletion

from app.core.config import Settings
from app.core.migrations import upgrade_to_head
from app.core.runtime import Runtime
from app.tracking.llm_client import AsyncLLMClient
from app.tracking.operations import CHAT

MESSAGES = [{"role": "user", "content": "Reply with one short sentence."}]
MODEL = "gpt-4o-mini"
RESPONSE = ChatCompletion.model_validate(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": "A short sentence."},
            }
        ],
        "usage": {
            "prompt_tokens": 14,
            "completion_tokens": 5,
            "total_tokens": 19,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }
)


def best_us(func: Callable[[], Any], number: int) -> float:
    return round(min(timeit.repeat(func, number=number, repeat=3)) / number * 1e6, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--number", type=int, default=20000)
    number = parser.parse_args().number
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        upgrade_to_head(url)
        settings = Settings(
            database_url=url,
            openai_api_key="sk-bench",  # type: ignore[arg-type]
            openai_base_url="http://127.0.0.1:9/v1",  # never called
            spool_dir=Path(tmp) / "spool",
            tracking_writer="thread",
        )
        runtime = Runtime.build(settings, start_background=False)
        try:
            client = AsyncLLMClient(
                task_id="bench", user_id="bench", agent="bench", runtime=runtime
            )
            prepared = client._prepare(CHAT, {"messages": MESSAGES, "model": MODEL})
            tracker = prepared.tracker
            tracker.start()
            fields = CHAT.fields(RESPONSE)
            outcome = tracker.success_outcome(fields)
            figures = {
                "prepare_us": best_us(
                    lambda: client._prepare(CHAT, {"messages": MESSAGES, "model": MODEL}), number
                ),
                "reserve_nowait_us": best_us(lambda: client._reserve_nowait(prepared), number),
                "response_fields_us": best_us(lambda: CHAT.fields(RESPONSE), number),
                "success_outcome_us": best_us(lambda: tracker.success_outcome(fields), number),
                "metrics_us": best_us(lambda: tracker._observe(outcome), number),
            }
        finally:
            runtime.close()
    figures["sum_us"] = round(sum(figures.values()), 2)
    print(
        json.dumps(
            {
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "per_call": figures,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
