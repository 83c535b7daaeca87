"""The API under test, two ways.

* ``start_service``: a running service (lifespan included) with API keys issued through the real
  key service, for what authentication and the worker decide.
* ``report_app`` + ``client`` + ``act_as``: the real application on the test database with its
  runtime installed as the lifespan would and the caller given (an admin unless ``act_as``), for
  what the read endpoints answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.access import api_keys
from app.access.principal import Principal
from app.api.auth import current_principal
from app.core.config import Settings
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


ADMIN = Principal("root", "admin")


@pytest.fixture(scope="session")
def report_runtimes(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Runtime]]:
    """One runtime per database for the whole session (building one takes ~0.5 s)."""
    built: dict[str, Runtime] = {}
    yield built
    for runtime in built.values():
        runtime.close()


@pytest.fixture
def report_app(
    database_url: str,
    report_runtimes: dict[str, Runtime],
    tmp_path_factory: pytest.TempPathFactory,
) -> FastAPI:
    """The real application on the test database, its runtime installed as the lifespan would
    (the rest of the lifespan, the task worker and access control, is not needed here). No LLM
    call is made; the caller is an administrator until ``act_as`` says otherwise."""
    if database_url not in report_runtimes:
        settings = Settings(
            database_url=database_url,
            openai_api_key="sk-test-not-used",  # type: ignore[arg-type]
            openai_base_url="http://127.0.0.1:9/v1",  # no LLM call is made here
            spool_dir=tmp_path_factory.mktemp("spool"),
            auto_migrate=False,
        )
        report_runtimes[database_url] = Runtime.build(settings, start_background=False)
    application = create_app(report_runtimes[database_url].settings)
    application.state.runtime = report_runtimes[database_url]
    # Authentication is the auth module's (and its tests'); here the caller is given.
    application.dependency_overrides[current_principal] = lambda: ADMIN
    return application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An ASGI client of the test module's ``app``."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://asa.test") as c:
        yield c


@pytest.fixture
def act_as(app: FastAPI) -> Callable[[str], None]:
    """Make the requests come from a non-admin user."""

    def set_user(user_id: str) -> None:
        app.dependency_overrides[current_principal] = lambda: Principal(user_id, "user")

    return set_user
