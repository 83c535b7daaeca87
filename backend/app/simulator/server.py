"""Run the simulator with uvicorn on loopback in a background thread.

    with SimulatorServer(SimulatorConfig(latency_ms=5)) as sim:
        client = openai.OpenAI(api_key="sim", base_url=sim.base_url)
        ...
        assert sim.state.stats()["requests"] == 1
        httpx.post(f"{sim.url}/sim/reset", headers=sim.control_headers)  # the token is needed

``start()`` returns once the server accepts connections; ``stop()`` shuts it down and joins the
thread. Both are bounded: a server that does not come up or go down in time raises
``SimulatorError``. The port is chosen by the OS unless one is given.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

import uvicorn
from fastapi import FastAPI

from app.simulator.app import create_app
from app.simulator.config import SimulatorConfig
from app.simulator.state import SimulatorState

HOST = "127.0.0.1"
START_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 10.0
GRACEFUL_SHUTDOWN_SECONDS = 2


class SimulatorError(RuntimeError):
    """The simulator server failed to start or stop in time."""


class SimulatorServer:
    """The simulator served on ``127.0.0.1:<port>`` from a daemon thread."""

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        *,
        port: int = 0,
        log_level: str = "warning",
        control_token: str | None = None,
    ) -> None:
        self.app: FastAPI = create_app(config, control_token=control_token)
        self._requested_port = port
        self._log_level = log_level
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    @property
    def state(self) -> SimulatorState:
        """Counters, scripts and fault schedule, shared with the running server."""
        state: SimulatorState = self.app.state.simulator
        return state

    @property
    def control_token(self) -> str:
        """What the ``/sim/*`` control endpoints require as ``Authorization: Bearer``."""
        token: str = self.app.state.control_token
        return token

    @property
    def control_headers(self) -> dict[str, str]:
        """The header that opens the ``/sim/*`` control endpoints."""
        return {"Authorization": f"Bearer {self.control_token}"}

    @property
    def port(self) -> int:
        if self._port is None:
            raise SimulatorError("the simulator is not running")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``: the root, where ``/health`` and ``/sim/*`` live."""
        return f"http://{HOST}:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>/v1``: what an OpenAI client takes as ``base_url``."""
        return f"{self.url}/v1"

    def start(self) -> SimulatorServer:
        if self._thread is not None:
            raise SimulatorError("the simulator is already running")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, self._requested_port))
        except OSError:
            sock.close()
            raise
        config = uvicorn.Config(
            self.app,
            log_level=self._log_level,
            lifespan="off",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="llm-simulator", daemon=True
        )
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self._force_stop()
                sock.close()
                raise SimulatorError("the simulator did not start")
            time.sleep(0.01)
        self._port = sock.getsockname()[1]
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self.state.closing.set()
        server.should_exit = True
        thread.join(STOP_TIMEOUT_SECONDS)
        if thread.is_alive():
            self._force_stop()
            raise SimulatorError("the simulator did not stop in time")
        self._server = self._thread = None
        self._port = None
        self.state.closing.clear()

    def _force_stop(self) -> None:
        server, thread = self._server, self._thread
        if server is not None:
            server.should_exit = True
            server.force_exit = True
        if thread is not None:
            thread.join(STOP_TIMEOUT_SECONDS)
        self._server = self._thread = None

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
