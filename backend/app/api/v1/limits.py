"""``/api/v1/limits``: budget limits per task, per user (day, month) and global (day).

GET shows the effective limit (override, environment default or none), spent, reserved by calls
in flight and remaining in the current UTC window. PUT sets an administrator's override (a null
``limit_usd`` is explicitly unlimited); DELETE removes it so the default applies again. Rules and
windows: ``app.budgets.guard``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Response
from sqlalchemy.orm import Session

from app.api.auth import AdminPrincipal, CurrentPrincipal
from app.api.deps import RuntimeDep, SessionDep, TaskId, UserId
from app.budgets import limits as budget_limits
from app.budgets.limits import ScopeStatus
from app.budgets.store import OverrideRow
from app.core.money import pico_to_usd
from app.core.runtime import Runtime
from app.models import BudgetScope
from app.schemas.limits import (
    LimitOverride,
    LimitOverrideIn,
    LimitOverrideList,
    ScopeBudget,
    UserBudgets,
)

router = APIRouter(prefix="/api/v1/limits", tags=["limits"])

Period = Annotated[Literal["daily", "monthly"], Path(description="The user's UTC day or month.")]
_USER_SCOPES = {"daily": BudgetScope.USER_DAILY, "monthly": BudgetScope.USER_MONTHLY}
_WINDOWS: dict[BudgetScope, Literal["lifetime", "day", "month"]] = {
    BudgetScope.TASK: "lifetime",
    BudgetScope.USER_DAILY: "day",
    BudgetScope.USER_MONTHLY: "month",
    BudgetScope.GLOBAL_DAILY: "day",
}


def _budget(status: ScopeStatus) -> ScopeBudget:
    limit = status.limit.limit_pico
    remaining = status.remaining_pico
    return ScopeBudget(
        scope=status.scope,
        subject_id=status.subject_id,
        window=_WINDOWS[status.scope],
        window_start=status.window_start,
        window_end=status.window_end,
        limit_usd=None if limit is None else pico_to_usd(limit),
        limit_source=status.limit.source,
        soft_threshold=status.limit.soft_threshold,
        spent_usd=pico_to_usd(status.spent_pico),
        reserved_usd=pico_to_usd(status.reserved_pico),
        remaining_usd=None if remaining is None else pico_to_usd(remaining),
    )


def _override(row: OverrideRow) -> LimitOverride:
    return LimitOverride(
        scope=row.scope,
        subject_id=row.subject_id or None,
        limit_usd=None if row.limit_pico is None else pico_to_usd(row.limit_pico),
        soft_threshold=row.soft_threshold,
        updated_by=row.updated_by,
        updated_at=row.updated_at,
    )


def _put(
    session: Session,
    runtime: Runtime,
    principal: AdminPrincipal,
    scope: BudgetScope,
    subject_id: str,
    body: LimitOverrideIn,
) -> ScopeBudget:
    status = budget_limits.set_override(
        session,
        runtime.settings,
        scope,
        subject_id,
        limit_usd=body.limit_usd,
        soft_threshold=body.soft_threshold,
        updated_by=principal.user_id,
    )
    return _budget(status)


@router.get("/overrides", response_model=LimitOverrideList)
def list_overrides(
    session: SessionDep,
    _admin: AdminPrincipal,
    scope: Annotated[BudgetScope | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> LimitOverrideList:
    """Every stored override, by scope and subject."""
    rows = budget_limits.list_overrides(session, scope, limit=limit, offset=offset)
    return LimitOverrideList(items=[_override(r) for r in rows], limit=limit, offset=offset)


@router.get("/global", response_model=ScopeBudget)
def get_global(session: SessionDep, runtime: RuntimeDep, _admin: AdminPrincipal) -> ScopeBudget:
    """Everyone's spend today (UTC) against the global daily cap."""
    status = budget_limits.scope_status(session, runtime.settings, BudgetScope.GLOBAL_DAILY, "")
    return _budget(status)


@router.put("/global", response_model=ScopeBudget)
def put_global(
    body: LimitOverrideIn, session: SessionDep, runtime: RuntimeDep, admin: AdminPrincipal
) -> ScopeBudget:
    return _put(session, runtime, admin, BudgetScope.GLOBAL_DAILY, "", body)


@router.delete("/global", status_code=204, response_class=Response)
def delete_global(session: SessionDep, _admin: AdminPrincipal) -> None:
    budget_limits.remove_override(session, BudgetScope.GLOBAL_DAILY, "")


@router.get("/tasks/{task_id}", response_model=ScopeBudget)
def get_task(
    task_id: TaskId, session: SessionDep, runtime: RuntimeDep, _admin: AdminPrincipal
) -> ScopeBudget:
    """A task's spend over its whole life against its cap."""
    return _budget(budget_limits.scope_status(session, runtime.settings, BudgetScope.TASK, task_id))


@router.put("/tasks/{task_id}", response_model=ScopeBudget)
def put_task(
    task_id: TaskId,
    body: LimitOverrideIn,
    session: SessionDep,
    runtime: RuntimeDep,
    admin: AdminPrincipal,
) -> ScopeBudget:
    return _put(session, runtime, admin, BudgetScope.TASK, task_id, body)


@router.delete("/tasks/{task_id}", status_code=204, response_class=Response)
def delete_task(task_id: TaskId, session: SessionDep, _admin: AdminPrincipal) -> None:
    budget_limits.remove_override(session, BudgetScope.TASK, task_id)


@router.get("/users/{user_id}", response_model=UserBudgets)
def get_user(
    user_id: UserId, session: SessionDep, runtime: RuntimeDep, principal: CurrentPrincipal
) -> UserBudgets:
    """A user's spend today and this month (UTC) against their caps; users may read their own."""
    principal.ensure_can_read_user(user_id)
    daily, monthly = budget_limits.user_status(session, runtime.settings, user_id)
    return UserBudgets(user_id=user_id, daily=_budget(daily), monthly=_budget(monthly))


@router.put("/users/{user_id}/{period}", response_model=ScopeBudget)
def put_user(
    user_id: UserId,
    period: Period,
    body: LimitOverrideIn,
    session: SessionDep,
    runtime: RuntimeDep,
    admin: AdminPrincipal,
) -> ScopeBudget:
    return _put(session, runtime, admin, _USER_SCOPES[period], user_id, body)


@router.delete("/users/{user_id}/{period}", status_code=204, response_class=Response)
def delete_user(
    user_id: UserId, period: Period, session: SessionDep, _admin: AdminPrincipal
) -> None:
    budget_limits.remove_override(session, _USER_SCOPES[period], user_id)
