"""Dependencies shared by the routers."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import Request
from sqlalchemy.orm import Session

from app.core.runtime import Runtime


def get_app_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, committed in one place when the handler succeeds.

    Callables a handler appends to ``session.info["after_commit"]`` run once the commit is done.
    """
    runtime = get_app_runtime(request)
    with runtime.session_factory() as session:
        with session.begin():
            yield session
        for callback in session.info.pop("after_commit", []):
            callback()
