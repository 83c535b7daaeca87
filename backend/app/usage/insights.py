"""The service behind ``/usage/forecast``, ``/usage/anomalies`` and ``/usage/recommendations``
(and ``asa usage``): the results of ``app.usage.forecast``, ``anomalies`` and ``recommendations``
as the API's answers.

A recommendations report joins a month of finished tasks to their per-agent spend (everyone's:
tens of thousands of tasks, seconds at 10M ledger rows), so an answer is reused for
``RECOMMENDATION_CACHE_SECONDS`` per (subject, days, UTC day), and the dispatcher's scan
(``refresh_recommendations``) recomputes everyone's 30-day report ahead of the administrators
who ask for it. ``as_of`` says when an answer was computed.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, date, datetime

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.money import pico_to_usd
from app.core.prepared import per_engine
from app.schemas.usage_forecast import (
    AgentTaskCosts,
    AnomalyThresholds,
    CacheHits,
    ModelTaskCosts,
    RecommendationOut,
    SpendAnomaly,
    UsageAnomalies,
    UsageForecast,
    UsageRecommendations,
    WasteFigures,
)
from app.usage import anomalies as spend_anomalies
from app.usage import forecast as usage_forecast
from app.usage import recommendations as waste
from app.usage.recommendations import TaskOutcomes


def forecast_answer(result: usage_forecast.SpendForecast) -> UsageForecast:
    return UsageForecast(
        scope="everyone" if result.user_id is None else "user",
        user_id=result.user_id,
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


def anomalies(
    session: Session, settings: Settings, user_id: str | None, now: datetime, hours: int
) -> UsageAnomalies:
    """The anomalous hours among the last ``hours`` of ``user_id`` (None: every user and
    model)."""
    th = spend_anomalies.Thresholds.from_settings(settings)
    found = spend_anomalies.find_anomalies(
        session.connection(), th, now, hours=hours, user_id=user_id
    )
    since, until = spend_anomalies.window(now, hours)
    return UsageAnomalies(
        scope="everyone" if user_id is None else "user",
        user_id=user_id,
        since=since,
        until=until,
        items=[SpendAnomaly(**a.figures()) for a in found],
        thresholds=AnomalyThresholds(
            baseline_hours=th.baseline_hours,
            min_active_hours=th.min_active_hours,
            threshold=th.threshold,
            min_excess_usd=settings.anomaly_min_excess_usd,
        ),
        method=spend_anomalies.METHOD,
    )


def _costs(o: TaskOutcomes) -> dict[str, object]:
    return {
        "tasks": o.tasks,
        "succeeded": o.succeeded,
        "failed": o.failed,
        "success_rate": None if o.success_rate is None else round(o.success_rate, 4),
        "succeeded_spend_usd": pico_to_usd(o.succeeded_pico),
        "failed_spend_usd": pico_to_usd(o.failed_pico),
        "cost_per_fixed_bug_usd": o.cost_per_fixed_bug,
        "all_in_cost_per_fixed_bug_usd": o.all_in_cost_per_fixed_bug,
    }


ReportKey = tuple[str | None, int, date, int]
DEFAULT_DAYS = 30


class _Reports:
    """Recommendation answers of one engine, each kept until it expires (bounded)."""

    LIMIT = 1000

    def __init__(self, _engine: Engine) -> None:
        self._answers: dict[ReportKey, tuple[float, UsageRecommendations]] = {}
        self._lock = threading.Lock()

    def get(self, key: ReportKey) -> UsageRecommendations | None:
        with self._lock:
            found = self._answers.get(key)
        return found[1] if found is not None and found[0] > time.monotonic() else None

    def put(self, key: ReportKey, answer: UsageRecommendations, ttl: float) -> None:
        with self._lock:
            if len(self._answers) >= self.LIMIT:
                self._answers.clear()
            self._answers[key] = (time.monotonic() + ttl, answer)


_reports = per_engine(_Reports)


def recommendations(
    session: Session, settings: Settings, user_id: str | None, now: datetime, days: int
) -> UsageRecommendations:
    """The waste report of ``user_id`` (None: everyone) over the last ``days`` UTC days (a
    cached answer when one of the same day is fresh)."""
    engine = session.get_bind()
    key: ReportKey = (user_id, days, now.astimezone(UTC).date(), settings.recommendation_min_tasks)
    cache = _reports(engine) if isinstance(engine, Engine) else None
    found = cache.get(key) if cache is not None else None
    if found is not None:
        return found
    answer = compute_recommendations(session, settings, user_id, now, days)
    if cache is not None and settings.recommendation_cache_seconds > 0:
        cache.put(key, answer, settings.recommendation_cache_seconds)
    return answer


def refresh_recommendations(engine: Engine, settings: Settings, now: datetime) -> None:
    """Recompute everyone's default report into the cache (the dispatcher's scan)."""
    if settings.recommendation_cache_seconds <= 0:
        return
    with Session(engine) as session:
        answer = compute_recommendations(session, settings, None, now, DEFAULT_DAYS)
    key: ReportKey = (None, DEFAULT_DAYS, now.astimezone(UTC).date(),
                      settings.recommendation_min_tasks)  # fmt: skip
    _reports(engine).put(key, answer, settings.recommendation_cache_seconds)


def compute_recommendations(
    session: Session, settings: Settings, user_id: str | None, now: datetime, days: int
) -> UsageRecommendations:
    """The waste report of ``user_id`` (None: everyone) over the last ``days`` UTC days."""
    min_tasks = settings.recommendation_min_tasks
    report = waste.build_recommendations(session.connection(), user_id, now, days, min_tasks)
    w = report.waste
    return UsageRecommendations(
        scope="everyone" if user_id is None else "user",
        user_id=user_id,
        since=report.since,
        until=report.until,
        days=days,
        as_of=now,
        min_tasks=min_tasks,
        waste=WasteFigures(
            requests=w.requests,
            spend_usd=pico_to_usd(w.spend_pico),
            failed_calls=w.failed_calls,
            failed_spend_usd=pico_to_usd(w.failed_pico),
            truncated_calls=w.truncated_calls,
            truncated_spend_usd=pico_to_usd(w.truncated_pico),
            retried_calls=w.retried_calls,
            extra_attempts=w.extra_attempts,
            retried_spend_usd=pico_to_usd(w.retried_pico),
            blocked_calls=w.blocked_calls,
        ),
        cache=[
            CacheHits(
                model=c.model,
                prompt_tokens=c.prompt_tokens,
                cached_tokens=c.cached_tokens,
                hit_ratio=None if c.hit_ratio is None else round(c.hit_ratio, 4),
            )
            for c in report.cache
        ],
        models=[
            ModelTaskCosts(model=model, **_costs(o)) for model, o in sorted(report.models.items())
        ],
        agents=[
            AgentTaskCosts(agent=agent, model=model, **_costs(o))
            for (agent, model), o in sorted(report.agents.items())
        ],
        recommendations=[
            RecommendationOut(
                kind=r.kind,
                message=r.message,
                figures=r.figures,
                estimated_savings_usd=r.estimated_savings_usd,
            )
            for r in report.recommendations
        ],
    )
