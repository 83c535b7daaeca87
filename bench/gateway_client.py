"""The upstream HTTP client alone: CPU per chat completion posted to the nginx upstream of
``gateway.py``, from one Python process and event loop, at 1, 8 and 50 concurrent calls.

ASA's gateway forwards with ``httpx2``; LiteLLM's proxy installs ``aiohttp``. Run each from the
venv that has it (the script itself needs only the standard library and that client):

    cd backend && .venv/bin/python ../bench/gateway_client.py --client httpx2
    /opt/litellm-venv/bin/python bench/gateway_client.py --client aiohttp
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from gateway_procs import REQUEST, UPSTREAM_KEY, Placement, nginx_upstream, priority

BODY = json.dumps(REQUEST).encode()
HEADERS = {"Authorization": f"Bearer {UPSTREAM_KEY}", "Content-Type": "application/json"}
WARM_UP_PER_TASK = 20

Post = Callable[[], Awaitable[Any]]


async def measure(post: Post, concurrency: int, calls: int) -> tuple[float, float]:
    """(calls/s, CPU ms per call) of ``calls`` posts, ``concurrency`` at a time."""

    async def lane(count: int) -> None:
        for _ in range(count):
            await post()

    await asyncio.gather(*(lane(WARM_UP_PER_TASK) for _ in range(concurrency)))
    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(lane(calls // concurrency) for _ in range(concurrency)))
    done = calls // concurrency * concurrency
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return done / wall, 1000 * cpu / done


async def with_client(name: str, url: str, concurrency: int, calls: int) -> tuple[float, float]:
    module: Any = importlib.import_module(name)
    if name == "aiohttp":
        connector = module.TCPConnector(limit=0)
        async with module.ClientSession(connector=connector) as session:

            async def post_aiohttp() -> Any:
                async with session.post(url, data=BODY, headers=HEADERS) as response:
                    return await response.json()

            return await measure(post_aiohttp, concurrency, calls)
    async with module.AsyncClient(timeout=10) as client:  # httpx2 (or httpx)

        async def post_httpx() -> Any:
            return (await client.post(url, content=BODY, headers=HEADERS)).json()

        return await measure(post_httpx, concurrency, calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--client", choices=("httpx2", "httpx", "aiohttp"), default="httpx2")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--nice", type=int, help="niceness of this session (root for < 0)")
    args = parser.parse_args()
    with (
        priority(args.nice),
        tempfile.TemporaryDirectory(prefix="gwclient-") as tmp,
        nginx_upstream(Path(tmp), Placement()) as upstream,
    ):
        url = f"{upstream.url}/chat/completions"
        for concurrency in (1, 8, 50):
            rate, cpu = asyncio.run(with_client(args.client, url, concurrency, args.calls))
            print(f"{args.client} c{concurrency}: {rate:7.0f} calls/s, CPU {cpu:.3f} ms/call")


if __name__ == "__main__":
    main()
