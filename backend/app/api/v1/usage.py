"""``/api/v1/usage``: what tasks, users and everyone spent, task metrics, and row export.

Reports read the daily rollups only; ``days`` windows are whole UTC days (see
``app.usage.report``). Costs are exact decimal strings.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse
from pydantic import BeforeValidator

from app.api.auth import AdminPrincipal, CurrentPrincipal
from app.api.deps import ID_DESCRIPTION, ID_PATTERN, RuntimeDep, SessionDep, TaskId, UserId
from app.core.errors import InvalidInput
from app.schemas.usage import (
    OverallUsageResponse,
    TaskMetricsResponse,
    TaskUsageResponse,
    UserUsageResponse,
)
from app.usage import export as usage_export
from app.usage import report as usage_report
from app.usage import task_metrics as task_metrics_report
from app.usage.report import MAX_DAYS, MIN_DAYS

router = APIRouter(prefix="/api/v1/usage", tags=["usage"])

_DAYS_RE = re.compile(r"[0-9]{1,4}")
_DAYS_MESSAGE = f"days must be an integer from {MIN_DAYS} to {MAX_DAYS}"


def _parse_days(value: Any) -> int:
    """Whole days only: "7" yes; "7.0", "1e1", " 7", "-1" and 0 or 366 are refused."""
    if isinstance(value, bool):
        raise ValueError(_DAYS_MESSAGE)
    if isinstance(value, str) and _DAYS_RE.fullmatch(value):
        value = int(value)
    if not isinstance(value, int) or not MIN_DAYS <= value <= MAX_DAYS:
        raise ValueError(_DAYS_MESSAGE)
    return value


def _days(default: int) -> Any:
    return Query(
        ge=MIN_DAYS,
        le=MAX_DAYS,
        description=(
            f"Whole UTC days to cover, ending today ({MIN_DAYS}-{MAX_DAYS}; default {default})."
        ),
    )


Days = BeforeValidator(_parse_days)


async def utc_now() -> datetime:
    """The request's clock (a dependency, so tests can pin it; async, so no thread hop)."""
    return datetime.now(UTC)


Now = Annotated[datetime, Depends(utc_now)]


@router.get("/task/{task_id}", response_model=TaskUsageResponse)
def get_task_usage(
    task_id: TaskId, session: SessionDep, principal: CurrentPrincipal
) -> TaskUsageResponse:
    """Everything a task's calls cost, by model, UTC day, agent, provider and operation (all
    time).

    404 when no call was recorded for the task, and the same 404 unless you are an admin or the
    task's user.
    """
    return usage_report.task_usage(session, principal, task_id)


@router.get("/user/{user_id}", response_model=UserUsageResponse)
def get_user_usage(
    user_id: UserId,
    session: SessionDep,
    principal: CurrentPrincipal,
    now: Now,
    days: Annotated[int, _days(30), Days] = 30,
) -> UserUsageResponse:
    """A user's calls over the last ``days`` UTC days, by model, day, provider and operation
    (yours, or admin)."""
    return usage_report.user_usage(
        session, principal, user_id, usage_report.usage_window(days, now)
    )


@router.get("/overall", response_model=OverallUsageResponse)
def get_overall_usage(
    session: SessionDep,
    _admin: AdminPrincipal,
    now: Now,
    days: Annotated[int, _days(7), Days] = 7,
) -> OverallUsageResponse:
    """Every call over the last ``days`` UTC days, by model, day, provider and operation
    (admin)."""
    return usage_report.overall_usage(session, usage_report.usage_window(days, now))


@router.get("/metrics/tasks", response_model=TaskMetricsResponse)
def get_task_metrics(
    session: SessionDep,
    _admin: AdminPrincipal,
    now: Now,
    days: Annotated[int, _days(7), Days] = 7,
) -> TaskMetricsResponse:
    """Tasks finished in the last ``days`` UTC days: counts by outcome, success rate, duration
    percentiles and cost per task (admin). The ``task_metrics`` rows it reads are specified in
    ``app.usage.task_metrics``."""
    return task_metrics_report.task_metrics(session, usage_report.usage_window(days, now))


def _as_utc(name: str, value: datetime | None) -> datetime | None:
    """Naive datetimes are taken as UTC; ones that leave the calendar in UTC are refused."""
    if value is None:
        return None
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except (OverflowError, ValueError) as exc:
        raise InvalidInput(f"{name} is out of range.") from exc


@router.get(
    "/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The rows, streamed, in time order.",
            "content": {"text/csv": {}, "application/json": {}},
        }
    },
)
def export_usage(
    session: SessionDep,
    runtime: RuntimeDep,
    principal: CurrentPrincipal,
    fmt: Annotated[
        usage_export.ExportFormat, Query(alias="format", description="csv or json")
    ] = "csv",
    task_id: Annotated[
        str | None, Query(max_length=64, pattern=ID_PATTERN, description=ID_DESCRIPTION)
    ] = None,
    user_id: Annotated[
        str | None, Query(max_length=64, pattern=ID_PATTERN, description=ID_DESCRIPTION)
    ] = None,
    since: Annotated[datetime | None, Query(description="ISO 8601; naive means UTC")] = None,
    until: Annotated[datetime | None, Query(description="exclusive; ISO 8601")] = None,
) -> StreamingResponse:
    """Usage rows of a task, a user and/or a time range as CSV or JSON, streamed.

    A task's rows: admin or the task's user; a user's rows: that user or admin; everything
    else: admin. Rows older than the retention period have been pruned.
    """
    flt = usage_export.ExportFilter(
        task_id=task_id,
        user_id=user_id,
        since=_as_utc("since", since),
        until=_as_utc("until", until),
    )
    usage_export.authorize_export(session, principal, flt)
    return StreamingResponse(
        usage_export.export_usage(runtime.engine, flt, fmt),
        media_type=usage_export.MEDIA_TYPES[fmt],
        headers={"Content-Disposition": f'attachment; filename="{flt.filename(fmt)}"'},
    )
