"""Dependencies and parameter types shared by the routers, defined once."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from sqlalchemy.orm import Session

from app.core.runtime import Runtime

# Task and user ids in paths and filters: what the ledger accepts from any caller of LLMClient.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$"
ID_DESCRIPTION = "1-64 characters: letters, digits and . _ : @ - (not first)."


def get_app_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, committed in one place when the handler succeeds.

    Callables a handler appends to ``session.info["after_commit"]`` run once the commit is done.
    Declared with ``scope="function"`` (``SessionDep``): the commit and those callables finish
    before the response is sent, so a client that acts on the answer sees what the request did
    (FastAPI's default ends a ``yield`` dependency after the response).
    """
    runtime = get_app_runtime(request)
    with runtime.session_factory() as session:
        with session.begin():
            yield session
        for callback in session.info.pop("after_commit", []):
            callback()


SessionDep = Annotated[Session, Depends(get_session, scope="function")]
RuntimeDep = Annotated[Runtime, Depends(get_app_runtime)]
TaskId = Annotated[
    str, Path(min_length=1, max_length=64, pattern=ID_PATTERN, description=ID_DESCRIPTION)
]
UserId = Annotated[
    str, Path(min_length=1, max_length=64, pattern=ID_PATTERN, description=ID_DESCRIPTION)
]
