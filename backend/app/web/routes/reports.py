"""The overview and the usage page (with its CSV downloads)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from app.api.deps import ID_PATTERN, RuntimeDep
from app.api.v1 import usage as usage_api
from app.web import usage as usage_view
from app.web.overview import build_overview
from app.web.render import ConsoleRoute, render
from app.web.routes import unit_of_work
from app.web.session import ConsolePrincipal, console_state

router = APIRouter(route_class=ConsoleRoute)
Text = Annotated[str | None, Query(max_length=200)]
Id = Annotated[str | None, Query(max_length=64, pattern=ID_PATTERN)]


@router.get("/")
def overview(request: Request, principal: ConsolePrincipal, runtime: RuntimeDep) -> Response:
    with unit_of_work(request) as session:
        data = build_overview(
            session, runtime.settings, principal, closed_days=console_state(request).closed_days
        )
    return render(request, "overview.html", {"o": data})


def _query(
    principal: ConsolePrincipal, group_by: str | None, since: str | None, until: str | None,
    user: str | None,
) -> usage_view.UsageQuery:  # fmt: skip
    today = datetime.now(UTC).date()
    return usage_view.parse_query(principal, group_by, since, until, user, today)


@router.get("/usage")
def usage(
    request: Request,
    principal: ConsolePrincipal,
    group_by: Text = None,
    since: Text = None,
    until: Text = None,
    user: Text = None,
) -> Response:
    query = _query(principal, group_by, since, until, user)
    closed_days = console_state(request).closed_days
    with unit_of_work(request) as session:
        table = usage_view.usage_table(session, query, closed_days=closed_days)
    params = {
        "group_by": query.group_by,
        "since": query.since.isoformat(),
        "until": query.until.isoformat(),
        **({"user": query.user_id} if query.user_id and principal.is_admin else {}),
    }
    export = {
        "since": query.export_since.isoformat(),
        "until": query.export_until.isoformat(),
        **({"user": query.user_id} if query.user_id else {}),
    }
    return render(
        request,
        "usage.html",
        {"t": table, "group_bys": usage_view.GROUP_BYS, "params": params, "export": export},
    )


@router.get("/usage/table.csv")
def usage_table_csv(
    request: Request,
    principal: ConsolePrincipal,
    group_by: Text = None,
    since: Text = None,
    until: Text = None,
    user: Text = None,
) -> Response:
    """The table as shown, as CSV."""
    query = _query(principal, group_by, since, until, user)
    with unit_of_work(request) as session:
        table = usage_view.usage_table(
            session, query, limit=None, closed_days=console_state(request).closed_days
        )
    name = f"usage-by-{query.group_by}-{query.since}-{query.until}.csv"
    return StreamingResponse(
        usage_view.table_csv(table),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@router.get("/usage/export.csv")
def usage_export_csv(
    request: Request,
    principal: ConsolePrincipal,
    runtime: RuntimeDep,
    since: Annotated[datetime | None, Query()] = None,
    until: Annotated[datetime | None, Query()] = None,
    user: Id = None,
    task: Id = None,
) -> Response:
    """The calls themselves: ``GET /api/v1/usage/export``, answered by the API's own handler
    (its authorization included) for the signed-in user."""
    if not principal.is_admin and task is None and user is None:
        user = principal.user_id  # your own calls; anyone else's is refused by the API's rule
    with unit_of_work(request) as session:
        return usage_api.export_usage(
            session, runtime, principal, "csv", task_id=task, user_id=user, since=since, until=until
        )
