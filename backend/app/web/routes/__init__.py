"""The console's routes, one module per area; ``console_router`` holds them all.

Routers are thin, as the API's: parse the query or the form (its CSRF token checked by the
``SignedInForm`` dependency), resolve the principal (``ConsolePrincipal``), do the database
work in one ``unit_of_work`` (the API's session dependency: one transaction, committed in one
place, then its after-commit callbacks), render a template.
"""

from __future__ import annotations

from contextlib import contextmanager

from fastapi import APIRouter

from app.api.deps import get_session
from app.web.render import ConsoleRoute

# The API's own unit of work (commit on success, roll back on error, then after-commit hooks),
# as a context manager: an error is rendered only once its transaction is rolled back.
unit_of_work = contextmanager(get_session)


def console_router() -> APIRouter:
    from app.web.routes import admin, auth, reports, tasks

    router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)
    for module in (auth, reports, tasks, admin):
        router.include_router(module.router)
    return router
