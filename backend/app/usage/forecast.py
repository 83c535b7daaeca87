"""Month-end spend, projected from the daily rollups, with a range.

The method, for one user or for everyone (``forecast_spend``):

1. **History**: the spend of each of the last ``HISTORY_DAYS`` (56) whole UTC days before today,
   from ``usage_rollup_user_daily`` (one user) or ``usage_rollup_daily_overall`` (everyone); a
   day without calls is a day of $0.
2. **Weekday seasonality**: the median spend of each weekday over the history, over the mean of
   the seven medians (medians: one spike does not make its weekday expensive). Fewer than 14
   days of history: no seasonality.
3. **Level and trend**: a Theil-Sen line (the median of the pairwise slopes, then the median
   intercept; robust to spikes) through the deseasonalized days of the history (``TREND_DAYS``:
   the backtest's error at the start of a month was 3.7 % over 56 days against 5.8 % over 28).
   Fewer than 7 days: a flat line at their median.
4. **Projection**: each remaining day of the month (today's remaining hours pro rata) is the line
   at that day times its weekday's factor, never below 0; the month-end figure adds them to what
   was spent so far this month (exact, today's spend included).
5. **Range** (80 %): ±1.28 standard deviations of the remaining spend, made of each day's
   ordinary noise (1.4826 x the median absolute deviation of the fit's residuals), the line's
   level and slope errors and each weekday factor's error. Spikes are outside it by design: it
   says how far ordinary days stray, not how large a one-off burst may be.

Backtested on generated histories (``tests/usage/test_forecast.py``; figures in
``docs/BENCHMARKS.md``).

``record_forecasts_over_budget`` (the dispatcher's periodic scan) records
``budget.forecast_over`` for each user whose month-end projection is above their monthly budget
(``BUDGET_USER_MONTHLY_USD`` or their override), once per user and month. It reads every
user's days in one query (``users_daily_spend``), not one per user.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from app.budgets import store as budget_store
from app.budgets.guard import effective_limit
from app.core.config import Settings
from app.core.money import PICO_PER_USD, pico_to_usd
from app.core.prepared import write_gate
from app.models import BudgetScope, UsageRollupDailyOverall, UsageRollupUserDaily
from app.notifications.events import forecast_over_budget_event
from app.notifications.outbox import record_event

HISTORY_DAYS = 56
TREND_DAYS = 56
MIN_SEASONAL_DAYS = 14
MIN_TREND_DAYS = 7
Z_80 = 1.2816
CONFIDENCE = Decimal("0.8")
METHOD = (
    "weekday seasonality (medians) x robust trend (Theil-Sen) over 56 days of daily rollups; "
    "80% range from the residuals' MAD and the fit's errors"
)


@dataclass(frozen=True, slots=True)
class Projection:
    """What the days after the history are expected to cost, in USD (floats: an estimate)."""

    remaining_usd: float
    sigma_usd: float
    weekday_factors: tuple[float, ...]  # Monday first
    level_usd: float  # the trend line at today, deseasonalized
    trend_usd_per_day: float


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def weekday_factors(daily: Sequence[float], first_weekday: int) -> tuple[float, ...]:
    """Each weekday's spend relative to the average day (Monday first; 1.0 each when unknown)."""
    if len(daily) < MIN_SEASONAL_DAYS:
        return (1.0,) * 7
    by_day: list[list[float]] = [[] for _ in range(7)]
    for i, value in enumerate(daily):
        by_day[(first_weekday + i) % 7].append(value)
    medians = [_median(v) for v in by_day]
    mean = sum(medians) / 7
    if mean <= 0:
        return (1.0,) * 7
    return tuple(m / mean for m in medians)


def theil_sen(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of the Theil-Sen line through ``points`` (x, y)."""
    slopes = [
        (y2 - y1) / (x2 - x1)
        for i, (x1, y1) in enumerate(points)
        for x2, y2 in points[i + 1 :]
        if x2 != x1
    ]
    slope = _median(slopes)
    intercept = _median([y - slope * x for x, y in points])
    return intercept, slope


def project(
    daily: Sequence[float],
    first_weekday: int,
    future_weekdays: Sequence[int],
    today_remaining_share: float,
) -> Projection:
    """Project the days after ``daily`` (whole days, oldest first, the first a ``first_weekday``).

    ``future_weekdays``: today's weekday, then each later day of the month's; today counts for
    ``today_remaining_share`` of a day (the share of its hours still to come).
    """
    n = len(daily)
    if n == 0:
        return Projection(0.0, 0.0, (1.0,) * 7, 0.0, 0.0)
    factors = weekday_factors(daily, first_weekday)
    start = max(0, n - TREND_DAYS)
    points = [
        (float(i), daily[i] / factors[(first_weekday + i) % 7])
        for i in range(start, n)
        if factors[(first_weekday + i) % 7] > 0
    ]
    if len(points) >= MIN_TREND_DAYS:
        intercept, slope = theil_sen(points)
    else:
        intercept, slope = _median([y for _, y in points]), 0.0

    def line(x: float) -> float:
        return max(0.0, intercept + slope * x)

    # The fit's residuals, deseasonalized; their robust scale is a day's ordinary noise.
    residuals = [y - line(x) for x, y in points]
    center = _median(residuals)
    sigma = 1.4826 * _median([abs(r - center) for r in residuals])
    # The line's own uncertainty: its level (a median: 1.25 x the mean's standard error) and,
    # when it has a slope, the slope (Theil-Sen: about 1.1 x least squares').
    m = len(points)
    x_mean = sum(x for x, _ in points) / m if m else 0.0
    sxx = sum((x - x_mean) ** 2 for x, _ in points)
    sigma_level = 1.2533 * sigma / math.sqrt(m) if m else 0.0
    fitted = sxx > 0 and m >= MIN_TREND_DAYS
    sigma_slope = 1.1 * sigma / math.sqrt(sxx) if fitted else 0.0
    # And each weekday's factor (a median of n / 7 days), relative to the average level.
    seasonal = n >= MIN_SEASONAL_DAYS
    level = _median([y for _, y in points])
    sigma_factor = 1.2533 * sigma / level / math.sqrt(n / 7) if seasonal and level > 0 else 0.0
    remaining = noise_var = weight = lever = 0.0
    by_weekday = [0.0] * 7
    for k, weekday in enumerate(future_weekdays):
        share = today_remaining_share if k == 0 else 1.0
        factor = factors[weekday]
        remaining += share * line(n + k) * factor
        noise_var += share * (factor * sigma) ** 2
        weight += share * factor
        lever += share * factor * (n + k - x_mean)
        by_weekday[weekday] += share * line(n + k) * factor
    variance = (
        noise_var
        + (weight * sigma_level) ** 2
        + (lever * sigma_slope) ** 2
        + sum((spend * sigma_factor) ** 2 for spend in by_weekday)
    )
    return Projection(
        remaining_usd=remaining,
        sigma_usd=math.sqrt(variance),
        weekday_factors=factors,
        level_usd=max(0.0, intercept + slope * n),
        trend_usd_per_day=slope,
    )


# -- from the rollups ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpendForecast:
    user_id: str | None  # None: everyone
    month_start: date
    month_end: date  # the last day of the month
    as_of: datetime
    spent_to_date_usd: Decimal
    projected_usd: Decimal
    low_usd: Decimal
    high_usd: Decimal
    history_days: int  # days of history that had any spend
    weekday_factors: tuple[float, ...]
    trend_usd_per_day: Decimal


def month_bounds(day: date) -> tuple[date, date]:
    """The first and the last day of ``day``'s month."""
    first = day.replace(day=1)
    following = (first.replace(day=28) + timedelta(days=4)).replace(day=1)
    return first, following - timedelta(days=1)


def daily_spend(session: Session, user_id: str | None, first: date, last: date) -> dict[date, int]:
    """Picodollars spent on each day from ``first`` to ``last`` (days without spend absent)."""
    table = UsageRollupUserDaily if user_id is not None else UsageRollupDailyOverall
    query = (
        select(table.day, func.sum(table.cost_pico_usd))
        .where(table.day >= first, table.day <= last)
        .group_by(table.day)
    )
    if user_id is not None:
        query = query.where(UsageRollupUserDaily.user_id == user_id)
    return {day: int(total or 0) for day, total in session.execute(query).all()}


def users_daily_spend(session: Session, first: date, last: date) -> dict[str, dict[date, int]]:
    """``daily_spend`` of every user with spend from ``first`` to ``last``, in one query."""
    r = UsageRollupUserDaily
    query = (
        select(r.user_id, r.day, func.sum(r.cost_pico_usd))
        .where(r.day >= first, r.day <= last, r.user_id != "")
        .group_by(r.user_id, r.day)
    )
    found: dict[str, dict[date, int]] = {}
    for user, day, total in session.execute(query).all():
        found.setdefault(str(user), {})[day] = int(total or 0)
    return found


def _history_window(today: date) -> tuple[date, date, date]:
    """The month's first and last day and the first day of the history, for ``today``."""
    first, last = month_bounds(today)
    return first, last, today - timedelta(days=HISTORY_DAYS)


def _usd(value: float) -> Decimal:
    """An estimate in USD, to the micro-dollar."""
    return Decimal(repr(max(0.0, value))).quantize(Decimal("0.000001"))


def forecast_spend(session: Session, user_id: str | None, now: datetime) -> SpendForecast:
    """The month-end spend of ``user_id`` (None: everyone) as of ``now`` (UTC)."""
    today = now.astimezone(UTC).date()
    first, _last, history_start = _history_window(today)
    spend = daily_spend(session, user_id, min(history_start, first), today)
    return forecast_from(spend, user_id, now)


def forecast_from(spend: dict[date, int], user_id: str | None, now: datetime) -> SpendForecast:
    """The forecast of ``user_id`` from its ``daily_spend`` (the history and this month)."""
    now = now.astimezone(UTC)
    today = now.date()
    first, last, history_start = _history_window(today)
    history = [
        spend.get(history_start + timedelta(days=i), 0) / PICO_PER_USD for i in range(HISTORY_DAYS)
    ]
    # Leading days before the first spend are not history (a new user, a new service).
    while history and history[0] == 0:
        history.pop(0)
    first_day = today - timedelta(days=len(history))
    future = [(today + timedelta(days=k)).weekday() for k in range((last - today).days + 1)]
    midnight = datetime.combine(today, datetime.min.time(), tzinfo=UTC)
    share_left = 1.0 - (now - midnight).total_seconds() / 86_400
    projection = project(history, first_day.weekday(), future, share_left)
    spent_pico = sum(pico for day, pico in spend.items() if first <= day <= today)
    spent = pico_to_usd(spent_pico)
    margin = Z_80 * projection.sigma_usd
    return SpendForecast(
        user_id=user_id,
        month_start=first,
        month_end=last,
        as_of=now,
        spent_to_date_usd=spent,
        projected_usd=spent + _usd(projection.remaining_usd),
        low_usd=spent + _usd(projection.remaining_usd - margin),
        high_usd=spent + _usd(projection.remaining_usd + margin),
        history_days=sum(1 for value in history if value > 0),
        weekday_factors=tuple(round(f, 4) for f in projection.weekday_factors),
        trend_usd_per_day=Decimal(repr(projection.trend_usd_per_day)).quantize(Decimal("0.000001")),
    )


# -- the forecast against the monthly budget ----------------------------------------------------

MAX_OVERRIDES = 100_000


def monthly_limits(session: Session, settings: Settings, users: list[str]) -> dict[str, int]:
    """Each user's monthly budget in picodollars (override, else the default); unlimited absent."""
    scope = BudgetScope.USER_MONTHLY
    overrides = {
        o.subject_id: o
        for o in budget_store.list_overrides(
            session.connection(), scope, limit=MAX_OVERRIDES, offset=0
        )
    }
    limits = {}
    for user in users:
        limit = effective_limit(settings, scope, overrides.get(user)).limit_pico
        if limit is not None:
            limits[user] = limit
    return limits


def forecasts_over_budget(
    session: Session, settings: Settings, now: datetime
) -> list[tuple[SpendForecast, int]]:
    """(forecast, monthly limit in picodollars) of each user projected above their limit.

    Every user with spend this month is judged, from one read of every user's days (the
    history and the month) and one of the overrides."""
    today = now.astimezone(UTC).date()
    first, _last, history_start = _history_window(today)
    spend = users_daily_spend(session, min(history_start, first), today)
    users = sorted(user for user, days in spend.items() if any(day >= first for day in days))
    over = []
    for user, limit_pico in monthly_limits(session, settings, users).items():
        result = forecast_from(spend[user], user, now)
        if result.projected_usd > pico_to_usd(limit_pico):
            over.append((result, limit_pico))
    return over


def record_forecasts_over_budget(
    engine: Engine, settings: Settings, now: datetime | None = None
) -> int:
    """Record ``budget.forecast_over`` for each user projected above their monthly budget,
    once per user and month; how many were new. Raises what the database raises."""
    now = now or datetime.now(UTC)
    with Session(engine) as session:
        over = forecasts_over_budget(session, settings, now)
    if not over:
        return 0
    events = [
        forecast_over_budget_event(
            user_id=str(f.user_id),
            month_start=f.month_start,
            limit_usd=pico_to_usd(limit_pico),
            projected_usd=f.projected_usd,
            low_usd=f.low_usd,
            high_usd=f.high_usd,
            spent_usd=f.spent_to_date_usd,
        )
        for f, limit_pico in over
    ]
    with write_gate(engine).transaction() as tx:
        return sum(record_event(tx, event) for event in events)
