"""Spend anomalies: an hour of a user's or a model's spend far above its own trailing baseline.

The method (``score_hour``), for one subject (a user, or a model) and one UTC hour:

1. **Baseline**: the subject's *active* hours (hours with any spend) among the
   ``ANOMALY_BASELINE_HOURS`` (168) whole hours before the one judged. Idle hours are left out:
   someone who works eight hours a day has sixteen idle ones, and comparing a working hour
   with a median of zero would flag every working hour. Fewer than
   ``ANOMALY_MIN_ACTIVE_HOURS`` (8) active hours: not enough to judge, nothing is flagged.
2. **Robust band**: the baseline's median and its scale, 1.4826 x the median absolute deviation
   (the standard deviation's robust twin: a past spike does not widen the band). The scale is
   never below 10 % of the median nor below $0.01, so a perfectly regular subject is not
   flagged for a cent.
3. **Out of band**: the hour's spend is anomalous when its robust z-score, (spend - median) /
   scale, reaches ``ANOMALY_THRESHOLD`` (6) *and* the spend exceeds the median by at least
   ``ANOMALY_MIN_EXCESS_USD`` ($1). Only spend above the band counts (a quiet hour costs nothing).

The hour in progress is judged on what it has spent so far: spend only grows within an hour, so
a partial hour already out of band is an anomaly for sure, told at once rather than at its end.
The hourly spend is read from ``usage_rollup_hourly`` (per user, UTC hour and model; written
with every call, revision 0016): a model's hour is the sum over its users. Each (dimension,
subject, hour) is one event (``usage.anomaly``; its id says which), so a scan
that sees it again records nothing new.

Backtested on generated histories with injected spikes (``tests/usage/test_anomalies.py``;
detection and false-alarm rates in ``docs/BENCHMARKS.md``).
"""

from __future__ import annotations

import bisect
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import BigInteger, Connection, Engine, cast, func, select

from app.core.config import Settings
from app.core.money import PICO_PER_USD
from app.core.prepared import write_gate
from app.models import UsageRollupHourly
from app.notifications.events import anomaly_event
from app.notifications.outbox import record_event

Dimension = Literal["user", "model"]
DIMENSIONS: tuple[Dimension, ...] = ("user", "model")
MAD_TO_SIGMA = 1.4826
MIN_RELATIVE_SCALE = 0.10
MIN_SCALE_USD = 0.01
METHOD = (
    "each hour against the subject's active hours of the trailing baseline: robust z-score "
    "(spend - median) / (1.4826 x MAD), flagged at the threshold and the minimum excess"
)


@dataclass(frozen=True, slots=True)
class Thresholds:
    baseline_hours: int = 168
    min_active_hours: int = 8
    threshold: float = 6.0
    min_excess_usd: float = 1.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Thresholds:
        return cls(
            baseline_hours=settings.anomaly_baseline_hours,
            min_active_hours=settings.anomaly_min_active_hours,
            threshold=settings.anomaly_threshold,
            min_excess_usd=float(settings.anomaly_min_excess_usd),
        )


@dataclass(frozen=True, slots=True)
class Score:
    median_usd: float
    scale_usd: float
    upper_usd: float  # the band's top: median + threshold x scale (and the minimum excess)
    z: float
    anomalous: bool


def score_hour(spend_usd: float, baseline_usd: Sequence[float], th: Thresholds) -> Score | None:
    """Judge one hour's spend against the active hours of its baseline; None: too few."""
    active = [value for value in baseline_usd if value > 0]
    if len(active) < th.min_active_hours:
        return None
    median = statistics.median(active)
    mad = statistics.median([abs(value - median) for value in active])
    scale = max(MAD_TO_SIGMA * mad, MIN_RELATIVE_SCALE * median, MIN_SCALE_USD)
    z = (spend_usd - median) / scale
    upper = max(median + th.threshold * scale, median + th.min_excess_usd)
    return Score(median, scale, upper, z, spend_usd >= upper)


@dataclass(frozen=True, slots=True)
class Anomaly:
    dimension: Dimension
    subject: str
    hour_start: datetime
    spend_usd: Decimal
    score: Score
    in_progress: bool

    def figures(self) -> dict[str, Any]:
        """The anomaly as the API and the ``usage.anomaly`` event tell it."""
        return {
            "dimension": self.dimension,
            "subject": self.subject,
            "hour_start": self.hour_start,
            "hour_in_progress": self.in_progress,
            "spend_usd": self.spend_usd,
            "baseline_median_usd": _usd(self.score.median_usd),
            "band_upper_usd": _usd(self.score.upper_usd),
            "score": round(self.score.z, 2),
        }


def detect(
    series: Mapping[int, float],
    hours: Iterable[int],
    th: Thresholds,
) -> list[tuple[int, Score]]:
    """The anomalous ``hours`` of one subject's hourly spend (hour index -> USD)."""
    # Only the active hours of a baseline count: find them by bisection in the sorted active
    # hours rather than looking up each of the baseline's 168 hours.
    active = sorted((hour, usd) for hour, usd in series.items() if usd > 0)
    starts = [hour for hour, _ in active]
    found = []
    for hour in hours:
        spend = series.get(hour, 0.0)
        if spend <= 0:
            continue
        first = bisect.bisect_left(starts, hour - th.baseline_hours)
        baseline = [usd for _, usd in active[first : bisect.bisect_left(starts, hour)]]
        score = score_hour(spend, baseline, th)
        if score is not None and score.anomalous:
            found.append((hour, score))
    return found


# -- from the ledger ---------------------------------------------------------------------------


def hour_index(moment: datetime) -> int:
    """Whole hours since the epoch (UTC); a naive ``moment`` is taken as UTC (SQLite's)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp()) // 3600


def hour_start(index: int) -> datetime:
    return datetime.fromtimestamp(index * 3600, UTC)


def hourly_spend(
    conn: Connection,
    dimension: Dimension,
    first_hour: int,
    end_hour: int,
    user_id: str | None = None,
) -> dict[str, dict[int, float]]:
    """Spend (USD) of each subject in each hour of ``[first_hour, end_hour)`` (hour indexes),
    of one user when ``user_id`` is given (through the hourly rollup's (user_id, hour) key).
    Hours without spend are absent; calls of no user count for their model only."""
    h = UsageRollupHourly
    subject = h.user_id if dimension == "user" else h.model
    spend = cast(func.sum(h.cost_pico_usd), BigInteger)
    query = (
        select(subject, h.hour, spend)
        .where(h.hour >= hour_start(first_hour), h.hour < hour_start(end_hour))
        .group_by(subject, h.hour)
        .having(func.sum(h.cost_pico_usd) > 0)
    )
    if dimension == "user":
        query = query.where(h.user_id != "")
    if user_id is not None:
        query = query.where(h.user_id == user_id)
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for name, hour, pico in conn.execute(query).all():
        series[str(name)][hour_index(hour)] = int(pico or 0) / PICO_PER_USD
    return series


def find_anomalies(
    conn: Connection,
    th: Thresholds,
    now: datetime,
    *,
    hours: int = 2,
    dimensions: Sequence[Dimension] = DIMENSIONS,
    user_id: str | None = None,
) -> list[Anomaly]:
    """Anomalous hours among the last ``hours`` (the one in progress included), newest first.

    ``user_id``: only that user's series (and no model's: a model's spend is everyone's).
    """
    current = hour_index(now)
    judged = range(current - hours + 1, current + 1)
    first = judged.start - th.baseline_hours
    found: list[Anomaly] = []
    for dimension in dimensions:
        if user_id is not None and dimension != "user":
            continue
        for subject, series in hourly_spend(conn, dimension, first, current + 1, user_id).items():
            for hour, score in detect(series, judged, th):
                found.append(
                    Anomaly(
                        dimension=dimension,
                        subject=subject,
                        hour_start=hour_start(hour),
                        spend_usd=_usd(series[hour]),
                        score=score,
                        in_progress=hour == current,
                    )
                )
    found.sort(key=lambda a: (a.hour_start, a.score.z), reverse=True)
    return found


def _usd(value: float) -> Decimal:
    return Decimal(repr(value)).quantize(Decimal("0.000001"))


def record_anomalies(engine: Engine, settings: Settings, now: datetime | None = None) -> int:
    """Record ``usage.anomaly`` for each anomalous hour of the last two (the one in progress
    and the one before, which may have crossed after the previous scan); how many were new.
    Raises what the database raises (the dispatcher logs it and tries again)."""
    now = now or datetime.now(UTC)
    with engine.connect() as conn:
        found = find_anomalies(conn, Thresholds.from_settings(settings), now)
    if not found:
        return 0
    events = [anomaly_event(**a.figures()) for a in found]
    with write_gate(engine).transaction() as tx:
        return sum(record_event(tx, event) for event in events)


def window(now: datetime, hours: int) -> tuple[datetime, datetime]:
    """The first and the last judged hour of the last ``hours`` hours."""
    current = hour_start(hour_index(now))
    return current - timedelta(hours=hours - 1), current
