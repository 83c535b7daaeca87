"""The console under test: the real application, started with its lifespan on the test
database (SQLite and PostgreSQL), driven over ASGI like a browser (cookies kept, forms posted
with the token their page carried)."""

from __future__ import annotations

import re
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
from app.simulator.server import SimulatorServer
from app.tasks import store as task_store
from tests.conftest import make_settings

TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')
LOOPBACK_CLIENT = ("127.0.0.1", 50000)


def csrf_token(html: str) -> str:
    found = TOKEN.search(html)
    assert found, "the page has no form token"
    return found.group(1)


@dataclass
class Browser:
    """An ASGI client that keeps cookies, as a browser does, with form helpers."""

    http: httpx.AsyncClient

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.http.get(path, **kwargs)

    async def post_form(
        self, path: str, data: dict[str, str], *, token_from: str | None = None, **kw: Any
    ) -> httpx.Response:
        """Post ``data`` with the token of the page at ``token_from`` (default: ``path``)."""
        page = await self.http.get(token_from or path)
        return await self.http.post(path, data={**data, "csrf_token": csrf_token(page.text)}, **kw)

    async def sign_in(self, key: str) -> httpx.Response:
        response = await self.post_form("/login", {"api_key": key, "next": "/"})
        assert response.status_code == 303, response.text
        return response


@dataclass
class Console:
    app: FastAPI
    runtime: Runtime
    clients: list[httpx.AsyncClient] = field(default_factory=list)

    def browser(self, client: tuple[str, int] = LOOPBACK_CLIENT) -> Browser:
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app, client=client),
            base_url="http://asa.test",
        )
        self.clients.append(http)
        return Browser(http)

    def api(self, key: str) -> httpx.AsyncClient:
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app, client=LOOPBACK_CLIENT),
            base_url="http://asa.test",
            headers={"Authorization": f"Bearer {key}"},
        )
        self.clients.append(http)
        return http

    def issue(self, user_id: str, role: api_keys.Role = "user") -> tuple[str, str]:
        """A new key of ``user_id``: (key id, key)."""
        with transaction(self.runtime.session_factory) as session:
            issued = api_keys.create_key(session, user_id=user_id, role=role)
        self.app.state.access.authenticator.note_key_issued()
        return issued.row.id, issued.key

    def revoke_elsewhere(self, key_id: str) -> None:
        """Revoke as the CLI does, in another process: the service's caches are not told."""
        with transaction(self.runtime.session_factory) as session:
            api_keys.revoke_key(session, key_id)


StartConsole = Callable[..., Awaitable[Console]]


@pytest.fixture(scope="session")
def examples_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One copy of the example repositories for the session (made by the first start)."""
    return tmp_path_factory.mktemp("examples")


@pytest.fixture
async def start_console(
    database_url: str, sim: SimulatorServer, tmp_path: Path, examples_dir: Path
) -> AsyncIterator[StartConsole]:
    """Start the app on the test database, calling the simulator (no task worker unless
    asked); everything is shut down at the end of the test."""
    started: list[tuple[Any, Console]] = []

    async def start(**overrides: Any) -> Console:
        overrides.setdefault("run_task_worker", False)
        overrides.setdefault("web_session_secret_file", tmp_path / "web_session_secret")
        overrides.setdefault("examples_dir", examples_dir)
        overrides.setdefault("workspace_root", tmp_path / "ws")
        settings = make_settings(database_url, sim.base_url, tmp_path, **overrides)
        app = create_app(settings)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        console = Console(app=app, runtime=app.state.runtime)
        started.append((lifespan, console))
        return console

    yield start
    for lifespan, console in reversed(started):
        for client in console.clients:
            await client.aclose()
        await lifespan.__aexit__(None, None, None)


def queue_task(console: Console, user_id: str, repo_url: str = "https://example.com/r.git") -> str:
    """A queued task of ``user_id``, as the submit endpoint stores it."""
    from app.access.principal import Principal
    from app.schemas.tasks import TaskSubmitRequest

    body = TaskSubmitRequest(repo_url=repo_url, bug_description="it breaks", test_command="pytest")
    with transaction(console.runtime.session_factory) as session:
        task = task_store.create_task(session, Principal(user_id, "user"), body, "gpt-4o-mini")
        return task.id
