"""The real application on the test database, over ASGI, without its lifespan: the runtime is
installed as the lifespan would install it, the caller is given (``act_as``), and the clock of
the forecast-based endpoints can be fixed. For what read endpoints answer on seeded data."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from pathlib import Path

import httpx
from fastapi import FastAPI
from sqlalchemy import Engine

from app.access.principal import Principal
from app.api.auth import current_principal
from app.api.v1.usage_forecast import forecast_clock
from app.core.config import Settings
from app.core.runtime import Runtime
from app.main import create_app


@contextmanager
def seeded_app(
    database_url: str,
    tmp_path: Path,
    *,
    seed: Callable[[Engine], object] | None = None,
    now: datetime | None = None,
) -> Iterator[FastAPI]:
    """The app on ``database_url`` after ``seed(engine)``, its clock at ``now`` if given; no
    LLM call is made. The runtime is closed on exit."""
    settings = Settings(
        database_url=database_url,
        openai_api_key="sk-test-not-used",  # type: ignore[arg-type]
        openai_base_url="http://127.0.0.1:9/v1",  # no LLM call is made here
        spool_dir=tmp_path / "spool",
        auto_migrate=False,
    )
    runtime = Runtime.build(settings, start_background=False)
    try:
        if seed is not None:
            seed(runtime.engine)
        app = create_app(settings)
        app.state.runtime = runtime
        if now is not None:
            app.dependency_overrides[forecast_clock] = lambda: now
        yield app
    finally:
        runtime.close()


@asynccontextmanager
async def asgi_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://asa.test") as client:
        yield client


def act_as(app: FastAPI, user: str, role: str = "user") -> None:
    """Make the app's requests come from ``user`` with ``role``."""
    app.dependency_overrides[current_principal] = lambda: Principal(user, role)  # type: ignore[arg-type]
