"""A running service (lifespan included) with API keys issued through the real key service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.access import api_keys
from app.core.db import transaction
from app.core.runtime import Runtime
from app.main import create_app


@dataclass
class Service:
    """One started app; ``client(key)`` talks to it over ASGI with that bearer key."""

    app: FastAPI
    runtime: Runtime
    clients: list[httpx.AsyncClient] = field(default_factory=list)

    def client(self, key: str | None = None, **headers: str) -> httpx.AsyncClient:
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://asa.test", headers=headers
        )
        self.clients.append(client)
        return client

    def issue(self, user_id: str, role: api_keys.Role = "user") -> tuple[str, str]:
        """A new key of ``user_id``: (key id, key)."""
        with transaction(self.runtime.session_factory) as session:
            issued = api_keys.create_key(session, user_id=user_id, role=role)
        self.app.state.access.authenticator.note_key_issued()  # as the admin API does
        return issued.row.id, issued.key

    def revoke(self, key_id: str, *, elsewhere: bool = False) -> None:
        """Revoke as the admin API does (at once), or ``elsewhere`` as the CLI does (the
        service notices within its cache time)."""
        with transaction(self.runtime.session_factory) as session:
            api_keys.revoke_key(session, key_id)
        if not elsewhere:
            self.app.state.access.authenticator.forget_cached_keys()


StartService = Callable[..., Awaitable[Service]]


@pytest.fixture
async def start_service(
    runtime_factory: Callable[..., Runtime], tmp_path: Path
) -> AsyncIterator[StartService]:
    """Start the app on the test database with settings overrides (no task worker unless
    asked); everything is shut down at the end of the test."""
    started: list[tuple[Any, Service]] = []

    async def start(**overrides: Any) -> Service:
        overrides.setdefault("run_task_worker", False)
        settings = runtime_factory(
            examples_dir=tmp_path / "examples", workspace_root=tmp_path / "ws", **overrides
        ).settings
        app = create_app(settings)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        service = Service(app=app, runtime=app.state.runtime)
        started.append((lifespan, service))
        return service

    yield start
    for lifespan, service in reversed(started):
        for client in service.clients:
            await client.aclose()
        await lifespan.__aexit__(None, None, None)
