"""``GET /api/v1/usage/forecast``: the month's spend projected to its end, with a range.

A user sees their own forecast; an administrator sees anyone's (``user_id``) or everyone's
(``everyone=true``). The method: ``app.usage.forecast``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from app.api.auth import CurrentPrincipal
from app.api.deps import ID_DESCRIPTION, ID_PATTERN, SessionDep
from app.core.errors import Forbidden, InvalidInput
from app.schemas.usage_forecast import UsageForecast
from app.usage import forecast as usage_forecast

router = APIRouter(prefix="/api/v1/usage", tags=["usage"])


async def forecast_clock() -> datetime:
    """The request's clock (a dependency, so tests can pin it)."""
    return datetime.now(UTC)


@router.get("/forecast", response_model=UsageForecast)
def get_forecast(
    session: SessionDep,
    principal: CurrentPrincipal,
    now: Annotated[datetime, Depends(forecast_clock)],
    user_id: Annotated[
        str | None,
        Query(max_length=64, pattern=ID_PATTERN, description=f"Whose spend. {ID_DESCRIPTION}"),
    ] = None,
    everyone: Annotated[bool, Query(description="Everyone's spend (administrators).")] = False,
) -> UsageForecast:
    """Month-end spend projected for you (or, for an administrator, a user or everyone)."""
    if everyone and user_id is not None:
        raise InvalidInput("Give user_id or everyone, not both.")
    if everyone and not principal.is_admin:
        raise Forbidden("Only administrators see everyone's forecast.")
    subject = None if everyone else (user_id or principal.user_id)
    if subject is not None:
        principal.ensure_can_read_user(subject)
    result = usage_forecast.forecast_spend(session, subject, now)
    return UsageForecast(
        scope="everyone" if subject is None else "user",
        user_id=subject,
        month_start=result.month_start,
        month_end=result.month_end,
        as_of=result.as_of,
        spent_to_date_usd=result.spent_to_date_usd,
        projected_usd=result.projected_usd,
        low_usd=result.low_usd,
        high_usd=result.high_usd,
        confidence=usage_forecast.CONFIDENCE,
        history_days=result.history_days,
        weekday_factors=list(result.weekday_factors),
        trend_usd_per_day=result.trend_usd_per_day,
        method=usage_forecast.METHOD,
    )
