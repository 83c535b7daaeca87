"""A live ASA backend for the observability tests, run as its own process.

It serves the real application (``create_app()``, configured from the environment) with uvicorn
on a loopback port, and takes commands as JSON lines on stdin, answering on stdout, so that the
test can make LLM calls through ``LLMClient`` inside the server's process: the calls then move
the very metrics that ``GET /metrics`` serves. Commands:

- ``{"op": "scripts", "rules": [...]}``: add simulator script rules (``app.simulator.config``).
- ``{"op": "calls", "calls": [{"model", "agent", "task_id", "user_id", "fault"?}, ...]}``: make
  the calls one after the other; answers ``{"event": "done", "results": [{"ok", "error"}]}``.
- ``{"op": "stop"}`` or end of input: shut the server down (its lifespan disposes of everything).

The first line written is ``{"event": "ready", "port": N}`` once the server accepts requests.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from typing import Any

import openai
import uvicorn

from app.core.runtime import get_runtime
from app.main import create_app
from app.simulator.config import parse_script_rules
from app.tracking.llm_client import LLMClient


def _reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _call(spec: dict[str, Any]) -> dict[str, Any]:
    client = LLMClient(
        task_id=spec.get("task_id"), user_id=spec.get("user_id"), agent=spec["agent"]
    )
    headers = {"x-sim-fault": spec["fault"]} if spec.get("fault") else None
    try:
        client.chat_completion(
            messages=[{"role": "user", "content": spec.get("prompt", "Fix the failing test.")}],
            model=spec["model"],
            extra_headers=headers,
        )
    except openai.OpenAIError as exc:
        return {"ok": False, "error": type(exc).__name__}
    return {"ok": True, "error": None}


def _control(server: uvicorn.Server) -> None:
    try:
        for line in sys.stdin:
            command = json.loads(line)
            if command["op"] == "scripts":
                simulator = get_runtime().simulator
                assert simulator is not None, "the backend is not using its built-in simulator"
                simulator.state.add_scripts(parse_script_rules(command["rules"]))
                _reply({"event": "done"})
            elif command["op"] == "calls":
                _reply({"event": "done", "results": [_call(spec) for spec in command["calls"]]})
            elif command["op"] == "stop":
                break
    finally:
        server.should_exit = True


def main() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(), log_config=None, access_log=False, lifespan="on")
    )

    def announce_when_started() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            _reply({"event": "ready", "port": port})
            _control(server)

    threading.Thread(target=announce_when_started, daemon=True).start()
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
