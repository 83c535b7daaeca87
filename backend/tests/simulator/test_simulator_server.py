"""SimulatorServer's lifecycle, the app in-process, and ``python -m app.simulator``."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from httpx import ASGITransport

from app.simulator import SimulatorConfig, SimulatorError, SimulatorServer, create_app

BACKEND_DIR = Path(__file__).resolve().parents[2]
MESSAGES = [{"role": "user", "content": "hi"}]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_server_serves_on_loopback_until_stopped() -> None:
    with SimulatorServer() as sim:
        base_url = sim.base_url
        assert base_url == f"http://127.0.0.1:{sim.port}/v1"
        assert httpx.get(f"{sim.url}/health").json() == {"status": "ok"}

    with pytest.raises(httpx.ConnectError):
        httpx.get(base_url.removesuffix("/v1") + "/health")
    with pytest.raises(SimulatorError):
        _ = sim.port


def test_two_servers_run_side_by_side_with_their_own_state() -> None:
    with SimulatorServer() as first, SimulatorServer() as second:
        assert first.port != second.port
        httpx.post(f"{first.base_url}/chat/completions", json={"model": "m", "messages": MESSAGES})

        assert first.state.stats()["requests"] == 1
        assert second.state.stats()["requests"] == 0


def test_server_takes_a_given_port() -> None:
    port = _free_port()
    with SimulatorServer(port=port) as sim:
        assert sim.base_url == f"http://127.0.0.1:{port}/v1"


def test_stop_ends_a_request_held_by_a_timeout_fault() -> None:
    sim = SimulatorServer(SimulatorConfig(timeout_fault_seconds=120)).start()
    errors: list[Exception] = []

    def call() -> None:
        with openai.OpenAI(
            api_key="sim", base_url=sim.base_url, max_retries=0, timeout=60
        ) as client:
            try:
                client.chat.completions.create(
                    model="m", messages=MESSAGES, extra_headers={"x-sim-fault": "timeout"}
                )
            except openai.OpenAIError as exc:
                errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 10
    while sim.state.stats()["faults"]["timeout"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    sim.stop()
    caller.join(30)

    assert not caller.is_alive()
    assert len(errors) == 1


async def test_app_serves_in_process_over_asgi_transport() -> None:
    app = create_app(SimulatorConfig(default_reply="in process"))
    async with httpx.AsyncClient(transport=ASGITransport(app), base_url="http://sim") as http:
        health = await http.get("/health")
        completion = await http.post(
            "/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES}
        )

    assert health.json() == {"status": "ok"}
    assert completion.json()["choices"][0]["message"]["content"] == "in process"


def test_module_runs_the_simulator_standalone(tmp_path: Path) -> None:
    port = _free_port()
    token_file = tmp_path / "control-token"
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "app.simulator", "--port", str(port)),
            *("--log-level", "warning", "--control-token-file", str(token_file)),
        ],
        cwd=BACKEND_DIR,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).raise_for_status()
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        with openai.OpenAI(api_key="sim", base_url=f"http://127.0.0.1:{port}/v1") as client:
            completion = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert completion.usage is not None
        assert completion.usage.total_tokens > 0
        token = token_file.read_text().strip()
        assert token_file.stat().st_mode & 0o777 == 0o600
        stats_url = f"http://127.0.0.1:{port}/sim/stats"
        assert httpx.get(stats_url).status_code == 401
        authorized = httpx.get(stats_url, headers={"Authorization": f"Bearer {token}"})
        assert authorized.json()["requests"] == 1
    finally:
        process.terminate()
        process.wait(timeout=10)
