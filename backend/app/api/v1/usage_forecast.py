"""Spend insights: ``GET /api/v1/usage/forecast`` (the month's spend projected to its end, with a
range), ``/usage/anomalies`` (hours out of band) and ``/usage/recommendations`` (waste, named).

A user sees their own; an administrator sees anyone's (``user_id``) or everyone's
(``everyone=true``). The methods: ``app.usage.forecast``, ``anomalies``, ``recommendations``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from app.access.principal import Principal
from app.api.auth import CurrentPrincipal
from app.api.deps import ID_DESCRIPTION, ID_PATTERN, RuntimeDep, SessionDep
from app.core.errors import Forbidden, InvalidInput
from app.schemas.usage_forecast import UsageAnomalies, UsageForecast, UsageRecommendations
from app.usage import forecast as usage_forecast
from app.usage import insights

router = APIRouter(prefix="/api/v1/usage", tags=["usage"])


async def forecast_clock() -> datetime:
    """The request's clock (a dependency, so tests can pin it)."""
    return datetime.now(UTC)


UserIdQuery = Annotated[
    str | None,
    Query(max_length=64, pattern=ID_PATTERN, description=f"Whose spend. {ID_DESCRIPTION}"),
]
EveryoneQuery = Annotated[bool, Query(description="Everyone's spend (administrators).")]


def _subject(principal: Principal, user_id: str | None, everyone: bool) -> str | None:
    """Whose figures the caller asked for (None: everyone), if they may see them."""
    if everyone and user_id is not None:
        raise InvalidInput("Give user_id or everyone, not both.")
    if everyone and not principal.is_admin:
        raise Forbidden("Only administrators see everyone's spend.")
    subject = None if everyone else (user_id or principal.user_id)
    if subject is not None:
        principal.ensure_can_read_user(subject)
    return subject


@router.get("/forecast", response_model=UsageForecast)
def get_forecast(
    session: SessionDep,
    principal: CurrentPrincipal,
    now: Annotated[datetime, Depends(forecast_clock)],
    user_id: UserIdQuery = None,
    everyone: EveryoneQuery = False,
) -> UsageForecast:
    """Month-end spend projected for you (or, for an administrator, a user or everyone)."""
    subject = _subject(principal, user_id, everyone)
    return insights.forecast_answer(usage_forecast.forecast_spend(session, subject, now))


@router.get("/anomalies", response_model=UsageAnomalies)
def get_anomalies(
    session: SessionDep,
    runtime: RuntimeDep,
    principal: CurrentPrincipal,
    now: Annotated[datetime, Depends(forecast_clock)],
    user_id: UserIdQuery = None,
    everyone: EveryoneQuery = False,
    hours: Annotated[
        int, Query(ge=1, le=168, description="Judge the last this many hours (1-168).")
    ] = 24,
) -> UsageAnomalies:
    """Hours whose spend was out of band: yours (per user), or for an administrator a user's, or
    everyone's (every user and every model)."""
    subject = _subject(principal, user_id, everyone)
    return insights.anomalies(session, runtime.settings, subject, now, hours)


@router.get("/recommendations", response_model=UsageRecommendations)
def get_recommendations(
    session: SessionDep,
    runtime: RuntimeDep,
    principal: CurrentPrincipal,
    now: Annotated[datetime, Depends(forecast_clock)],
    user_id: UserIdQuery = None,
    everyone: EveryoneQuery = False,
    days: Annotated[int, Query(ge=1, le=366, description="Whole UTC days, today's included.")] = 30,
) -> UsageRecommendations:
    """Where money went to waste, cost per fixed bug by model and agent, cache use, and cheaper
    models that fixed as often, each with its figures."""
    subject = _subject(principal, user_id, everyone)
    return insights.recommendations(session, runtime.settings, subject, now, days)
