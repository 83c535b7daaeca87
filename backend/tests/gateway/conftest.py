"""A live service (uvicorn on a loopback port, the real ``create_app``) whose gateway's default
upstream is the session's simulator, on SQLite and PostgreSQL; helpers to read its rows."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import Engine, select

from app.access import api_keys
from app.core.config import Settings
from app.core.db import create_db_engine, create_session_factory, transaction
from app.gateway.proxy import Gateway
from app.main import create_app
from app.models import LLMUsage
from app.simulator.server import SimulatorServer
from tests.conftest import make_settings

UPSTREAM_KEY = "sk-test-canary-key-0000"  # the simulator upstream's key (make_settings)


@dataclass
class LiveService:
    """A running service: its URLs, settings, database and simulator."""

    url: str
    settings: Settings
    engine: Engine
    sim: SimulatorServer
    app: FastAPI

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def rows(self, **where: Any) -> list[LLMUsage]:
        """``llm_usage`` rows matching ``where`` (column=value), oldest first."""
        factory = create_session_factory(self.engine)
        with transaction(factory) as session:
            stmt = select(LLMUsage).order_by(LLMUsage.timestamp, LLMUsage.id)
            for column, value in where.items():
                stmt = stmt.where(getattr(LLMUsage, column) == value)
            rows = list(session.scalars(stmt))
            session.expunge_all()
        return rows

    def row(self, request_id: str) -> LLMUsage:
        found = self.rows(request_id=request_id)
        assert len(found) == 1, f"{len(found)} rows for {request_id}"
        return found[0]

    def new_key(
        self, user_id: str, *, role: str = "user", allowed_models: list[str] | None = None
    ) -> tuple[str, str]:
        """Issue a key; (key id, key)."""
        with transaction(create_session_factory(self.engine)) as session:
            issued = api_keys.create_key(
                session,
                user_id=user_id,
                role=role,
                allowed_models=allowed_models,  # type: ignore[arg-type]
            )
            return issued.row.id, issued.key

    @property
    def gateway(self) -> Gateway:
        gateway: Gateway = self.app.state.gateway
        return gateway

    def sim_requests(self) -> int:
        stats = self.sim.state.stats()
        return int(stats["requests"])


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture
def start_service(
    database_url: str, sim: SimulatorServer, tmp_path: Path
) -> Iterator[Callable[..., LiveService]]:
    """``start_service(**setting_overrides)``: the real service on a loopback port."""
    servers: list[tuple[uvicorn.Server, threading.Thread, Engine]] = []

    def start(**overrides: Any) -> LiveService:
        settings = make_settings(
            database_url,
            sim.base_url,
            tmp_path,
            run_task_worker=False,
            notifications_dispatcher=False,
            **overrides,
        )
        sock = _free_socket()
        port = sock.getsockname()[1]
        app = create_app(settings)
        server = uvicorn.Server(
            uvicorn.Config(app, log_config=None, access_log=False, lifespan="on")
        )
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the service did not start")
            time.sleep(0.02)
        engine = create_db_engine(database_url)
        servers.append((server, thread, engine))
        return LiveService(f"http://127.0.0.1:{port}", settings, engine, sim, app)

    yield start
    for server, thread, engine in servers:
        server.should_exit = True
        thread.join(timeout=30)
        engine.dispose()


@pytest.fixture
def service(start_service: Callable[..., LiveService]) -> LiveService:
    return start_service()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def post(service: LiveService, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{service.base_url}{path}", json=body, timeout=30, **kwargs)
