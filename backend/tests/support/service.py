"""The serving process of the reliability suite: the real ASA service plus a stream of calls.

    serve(env, cwd, log_path, call_log, conn)   (started by
    ``tests.support.reliability.ServiceProcess``)

It serves ``create_app()`` with uvicorn on a loopback port, as ``make run`` does, and runs
a *call stream* inside that same process: lanes (threads) that make tracked LLM calls on the
service's own ``Runtime`` one after the other - ``sync`` lanes through ``LLMClient``, ``stream``
lanes with ``stream=True`` read to the end, ``async`` lanes through ``AsyncLLMClient`` on the
server's event loop. So a SIGTERM or SIGKILL sent to this process hits the process that tracks
the calls, its usage writer, its spool and its budget reservations; the HTTP API stays
available to the test on the same port. The process is forked from a forkserver that has
imported the app once (``tests.support.reliability.forkserver``), so a restart costs a second, not
the several seconds of importing the openai SDK.

Why a stream and not tasks: the service makes LLM calls from its task worker, but a task spends
most of its time cloning and running tests, so tasks give a few calls a second. The stream is
the task worker's shape without the sandbox: worker threads of the service calling the tracked
client, started after the runtime is built and drained *before* it is disposed of (the lifespan
below wraps the application's own, just as ``TaskWorker`` is stopped first in ``app.main``).
Scenario 5 and the load scenario also drive real tasks through the API.

Every call of the stream gets a unique ``task_id`` (its *key*, which lands in its ``llm_usage``
row) and a user message carrying that key (so simulator scripts can target one call). When a call
returns to its caller - with a response or with an exception - the lane appends one JSON line
``{"key", "rid", "ok", "error", "lane"}`` to the call log with a single ``write(2)`` on an
``O_APPEND`` descriptor: once written, the line survives SIGKILL of this process (the kernel has
it; only a machine crash could lose it, which is not what these tests simulate).

Commands come as dicts over a multiprocessing pipe; each is answered with one dict:

- ``{"op": "stream", "prefix": P, "lanes": {"sync": 2, "stream": 1, "async": 1}, "model": M,
  "pause_ms": 0, "max_calls": N}``: start the stream (``max_calls`` per lane, 0: until drained).
- ``{"op": "drain"}``: stop starting calls, wait for the ones in flight; answers the counts.
- ``{"op": "count"}``: calls returned so far, by outcome.
- ``{"op": "calls", "calls": [{"key", "stream"?, "fault"?, "headers"?, "model"?, "max_tokens"?}],
  "concurrency": N}``: make these calls (concurrently), answer each one's outcome.
- ``{"op": "stop"}``: shut the server down gracefully (as SIGTERM does).

The first message is ``{"event": "ready", "port": N, "pid": P}`` once the server accepts
requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from multiprocessing.connection import Connection
from typing import Any

import uvicorn
from fastapi import FastAPI

from app.core.runtime import get_runtime
from app.main import create_app
from app.tracking.llm_client import AsyncLLMClient, LLMClient

USER_ID = "rel-user"
AGENT = "FixAgent"


class CallLog:
    """Append-only log of the calls that returned to their caller, one ``write(2)`` per line."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._lock = threading.Lock()
        self.outcomes: Counter[str] = Counter()

    def returned(self, entry: dict[str, Any]) -> None:
        data = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        with self._lock:
            os.write(self._fd, data)
            self.outcomes["ok" if entry["ok"] else "error"] += 1

    def close(self) -> None:
        os.close(self._fd)


def _messages(key: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You are a reliability probe."},
        {"role": "user", "content": f"[{key}] Say something short."},
    ]


def _outcome(key: str, lane: str, response_id: str | None, exc: BaseException | None) -> Any:
    return {
        "key": key,
        "lane": lane,
        "rid": response_id,
        "ok": exc is None,
        "error": None if exc is None else type(exc).__name__,
    }


def sync_call(spec: dict[str, Any], lane: str) -> dict[str, Any]:
    """One tracked call through ``LLMClient``; a stream is read to its end."""
    key = spec["key"]
    client = LLMClient(task_id=key, user_id=USER_ID, agent=AGENT)
    headers = dict(spec.get("headers") or {})
    if spec.get("fault"):
        headers["x-sim-fault"] = spec["fault"]
    extra: dict[str, Any] = {"max_tokens": spec.get("max_tokens", 64)}
    try:
        if spec.get("stream"):
            stream: Any = client.chat_completion(
                _messages(key),
                spec.get("model"),
                stream=True,
                extra_headers=headers or None,
                **extra,
            )
            response_id = None
            for chunk in stream:
                response_id = chunk.id or response_id
        else:
            response: Any = client.chat_completion(
                _messages(key), spec.get("model"), extra_headers=headers or None, **extra
            )
            response_id = response.id
    except Exception as exc:  # the SDK's errors, and httpx's raised while a stream is read
        return _outcome(key, lane, None, exc)
    return _outcome(key, lane, response_id, None)


async def async_call(spec: dict[str, Any], lane: str) -> dict[str, Any]:
    key = spec["key"]
    client = AsyncLLMClient(task_id=key, user_id=USER_ID, agent=AGENT)
    try:
        response: Any = await client.chat_completion(
            _messages(key), spec.get("model"), max_tokens=spec.get("max_tokens", 64)
        )
    except Exception as exc:
        return _outcome(key, lane, None, exc)
    return _outcome(key, lane, response.id, None)


class CallStream:
    """Lanes of back-to-back tracked calls; ``drain`` waits for the calls in flight."""

    def __init__(self, log: CallLog) -> None:
        self.log = log
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self, command: dict[str, Any]) -> None:
        self._stop.clear()
        prefix = command["prefix"]
        pause = command.get("pause_ms", 0) / 1000
        limit = command.get("max_calls", 0)
        base = {"model": command.get("model"), "max_tokens": command.get("max_tokens", 64)}
        for kind, count in command["lanes"].items():
            for n in range(count):
                lane = f"{kind}{n}"
                target = self._async_lane if kind == "async" else self._sync_lane
                thread = threading.Thread(
                    target=target,
                    args=(f"{prefix}-{lane}", lane, kind == "stream", base, pause, limit),
                    name=f"rel-lane-{lane}",
                    daemon=True,
                )
                self._threads.append(thread)
                thread.start()

    def _sync_lane(
        self, prefix: str, lane: str, stream: bool, base: dict[str, Any], pause: float, limit: int
    ) -> None:
        n = 0
        while not self._stop.is_set() and (not limit or n < limit):
            self.log.returned(sync_call({**base, "key": f"{prefix}-{n}", "stream": stream}, lane))
            n += 1
            if pause:
                self._stop.wait(pause)

    def _async_lane(
        self, prefix: str, lane: str, _stream: bool, base: dict[str, Any], pause: float, limit: int
    ) -> None:
        # Async calls run on the server's event loop, where the service makes its async calls.
        assert self.loop is not None, "the stream starts once the server is up"
        n = 0
        while not self._stop.is_set() and (not limit or n < limit):
            call = async_call({**base, "key": f"{prefix}-{n}"}, lane)
            self.log.returned(asyncio.run_coroutine_threadsafe(call, self.loop).result())
            n += 1
            if pause:
                self._stop.wait(pause)

    def drain(self, timeout: float = 60.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]


def _control(server: uvicorn.Server, stream: CallStream, conn: Connection) -> None:
    try:
        while True:
            try:
                command = conn.recv()
            except EOFError:
                break
            op = command["op"]
            if op == "stream":
                stream.start(command)
                conn.send({"event": "streaming"})
            elif op == "drain":
                stream.drain()
                conn.send({"event": "drained", "outcomes": dict(stream.log.outcomes)})
            elif op == "count":
                conn.send({"event": "count", "outcomes": dict(stream.log.outcomes)})
            elif op == "calls":
                with ThreadPoolExecutor(max_workers=command.get("concurrency", 8)) as pool:
                    results = list(pool.map(lambda s: sync_call(s, "calls"), command["calls"]))
                for result in results:
                    stream.log.returned(result)
                conn.send({"event": "done", "results": results})
            elif op == "stop":
                break
    finally:
        server.should_exit = True


def build_app(stream: CallStream) -> FastAPI:
    """The service's app, with the call stream drained before the service's own shutdown."""
    app = create_app()
    service_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        async with service_lifespan(app) as state:
            get_runtime()  # the lifespan installed it; the stream's clients use it
            stream.loop = asyncio.get_running_loop()
            try:
                yield state
            finally:
                await asyncio.to_thread(stream.drain)

    app.router.lifespan_context = lifespan
    return app


def serve(env: dict[str, str], cwd: str, log_path: str, call_log: str, conn: Connection) -> None:
    """The serving process's main: configure it as a fresh process would be, then serve.

    Run in a child forked from a process that has already imported the application (a
    multiprocessing forkserver preloading this module): the same code as ``make run``, started
    in a fraction of the import time. The environment and working directory are replaced first,
    so the service reads its settings exactly as it would from a shell.
    """
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    stream = CallStream(CallLog(call_log))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            build_app(stream),
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=10,
        )
    )

    def announce_when_started() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.02)
        if server.started:
            conn.send({"event": "ready", "port": port, "pid": os.getpid()})
            _control(server, stream, conn)

    threading.Thread(target=announce_when_started, daemon=True).start()
    server.run(sockets=[sock])
    stream.log.close()
