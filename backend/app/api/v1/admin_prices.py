"""``/api/v1/admin/prices``: reprice past usage rows, and read the audit of each run
(administrators only).

The same operation as ``asa prices recompute``, with the service's current prices (its
``PRICES_FILE`` and ``PRICE_OVERRIDES``). The run goes on in the background of the service
(``app.prices.runner``): the request waits for it up to its ``wait_seconds`` (default 10) and
answers 200 with the finished run's audit record, or 202 with the running record and a
``Location`` where ``GET`` shows its progress (updated with every batch) and then its outcome.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from app.api.auth import AdminPrincipal
from app.api.deps import RuntimeDep, SessionDep
from app.prices import audit
from app.schemas.prices import RecomputeRequest, RecomputeRun, RecomputeRunList

router = APIRouter(prefix="/api/v1/admin/prices", tags=["admin"])
RunId = Annotated[str, Path(min_length=1, max_length=32, pattern=r"^[0-9a-f]+$")]


@router.post(
    "/recompute",
    response_model=RecomputeRun,
    responses={
        status.HTTP_202_ACCEPTED: {
            "model": RecomputeRun,
            "description": "Still running after wait_seconds: its record so far; poll Location.",
        }
    },
)
def recompute(
    body: RecomputeRequest,
    runtime: RuntimeDep,
    session: SessionDep,
    admin: AdminPrincipal,
    response: Response,
) -> RecomputeRun:
    """Reprice the rows in ``[since, until)`` (of ``model`` and ``provider`` if given) from their
    stored token counts; rows, rollups, task metrics and budget counters move together."""
    scope = audit.scope_of(body.since, body.until, body.model, body.provider)
    run = runtime.recomputes.start(
        runtime.engine, runtime.price_book, scope, actor=admin.user_id, dry_run=body.dry_run
    )
    if not run.wait(body.wait_seconds):
        response.status_code = status.HTTP_202_ACCEPTED
        response.headers["Location"] = f"{router.prefix}/recompute/{run.run_id}"
    return audit.get_run(session, run.run_id)


@router.get("/recompute", response_model=RecomputeRunList)
def list_recomputes(session: SessionDep, _admin: AdminPrincipal) -> RecomputeRunList:
    """The latest 100 runs, newest first."""
    return RecomputeRunList(items=audit.list_runs(session))


@router.get("/recompute/{run_id}", response_model=RecomputeRun)
def get_recompute(run_id: RunId, session: SessionDep, _admin: AdminPrincipal) -> RecomputeRun:
    """One run's audit record."""
    return audit.get_run(session, run_id)
