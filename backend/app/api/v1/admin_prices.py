"""``/api/v1/admin/prices``: reprice past usage rows, and read the audit of each run
(administrators only).

The same operation as ``asa prices recompute``, with the service's current prices (its
``PRICES_FILE`` and ``PRICE_OVERRIDES``). The run happens within the request, batch by batch; its
audit record (``GET``) shows its progress and its outcome.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from app.api.auth import AdminPrincipal
from app.api.deps import RuntimeDep, SessionDep
from app.prices import audit
from app.prices.recompute import recompute_prices
from app.schemas.prices import RecomputeRequest, RecomputeRun, RecomputeRunList

router = APIRouter(prefix="/api/v1/admin/prices", tags=["admin"])
RunId = Annotated[str, Path(min_length=1, max_length=32, pattern=r"^[0-9a-f]+$")]


@router.post("/recompute", response_model=RecomputeRun)
def recompute(
    body: RecomputeRequest, runtime: RuntimeDep, session: SessionDep, admin: AdminPrincipal
) -> RecomputeRun:
    """Reprice the rows in ``[since, until)`` (of ``model`` and ``provider`` if given) from their
    stored token counts; rows, rollups, task metrics and budget counters move together."""
    scope = audit.scope_of(body.since, body.until, body.model, body.provider)
    run_id = recompute_prices(
        runtime.engine, runtime.price_book, scope, actor=admin.user_id, dry_run=body.dry_run
    )
    return audit.get_run(session, run_id)


@router.get("/recompute", response_model=RecomputeRunList)
def list_recomputes(session: SessionDep, _admin: AdminPrincipal) -> RecomputeRunList:
    """The latest 100 runs, newest first."""
    return RecomputeRunList(items=audit.list_runs(session))


@router.get("/recompute/{run_id}", response_model=RecomputeRun)
def get_recompute(run_id: RunId, session: SessionDep, _admin: AdminPrincipal) -> RecomputeRun:
    """One run's audit record."""
    return audit.get_run(session, run_id)
