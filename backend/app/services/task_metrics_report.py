"""Task execution metrics (``GET /api/v1/usage/metrics/tasks``), read from ``task_metrics``.

Contract for the writer (the orchestrator)
------------------------------------------
When a task reaches a terminal state, write its rows in one transaction, all with the same
``timestamp`` (the moment it finished, timezone-aware UTC), one row per (task_id, metric_name):

=====================  ===============================================================
``metric_name``        ``metric_value``
=====================  ===============================================================
``succeeded``          ``1`` if the task produced a verified fix, else ``0``. Required:
                       a task is counted as finished in a window iff this row's
                       timestamp is in it.
``duration_seconds``   Wall-clock seconds from start to finish (a non-negative number).
``cost_usd``           What the task's LLM calls cost, in USD, at most 12 decimal places
                       (``pico_to_usd`` of the ledger's sum is exactly that).
``status.<name>``      ``1``, with ``<name>`` one of :data:`TASK_STATUSES`; optional, and
                       gives the finer ``by_status`` counts.
=====================  ===============================================================

Other names (``attempts``, ``llm_calls``, ``tests_passed_before``, ``tests_passed_after``) may be
written too; this report ignores them. Each metric is windowed by its own row's timestamp,
which is why all of a task's rows share one.

Figures: duration percentiles are exact, interpolated linearly between ranks like PostgreSQL's
``percentile_cont`` (which computes them on PostgreSQL; SQLite streams the sorted values). Costs
are exact on PostgreSQL (``NUMERIC`` sums); SQLite keeps ``NUMERIC`` as a double, so there each
value is rounded to the picodollar before summing, exact for a single task's cost up to about
$4,000. The average per task is rounded half-even to the picodollar.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from sqlalchemy import BigInteger, Connection, Float, and_, case, cast, func, select, type_coerce
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from app.core.money import PICO_PER_USD, pico_to_usd
from app.models import TaskMetrics
from app.schemas.usage import DurationStats, TaskCostStats, TaskMetricsResponse, UsageWindow

SUCCEEDED = "succeeded"
DURATION_SECONDS = "duration_seconds"
COST_USD = "cost_usd"
STATUS_PREFIX = "status."
TASK_STATUSES: tuple[str, ...] = ("succeeded", "failed", "budget_exceeded", "cancelled", "error")
QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.95, 0.99)


def _in_window(names: Sequence[str], window: UsageWindow) -> Any:
    t = TaskMetrics
    return and_(t.metric_name.in_(names), t.timestamp >= window.since, t.timestamp < window.until)


def interpolated_quantile(sorted_values: Sequence[float], q: float) -> float:
    """``percentile_cont``: the value at rank ``q * (n - 1)``, interpolated between neighbours."""
    position = q * (len(sorted_values) - 1)
    lower = int(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    fraction = position - lower
    return sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * fraction


def _outcome_counts(conn: Connection, window: UsageWindow) -> dict[str, tuple[int, int]]:
    """Per outcome metric name: (rows, rows valued 1)."""
    t = TaskMetrics
    names = [SUCCEEDED, *(STATUS_PREFIX + s for s in TASK_STATUSES)]
    stmt = (
        select(t.metric_name, func.count(), func.sum(case((t.metric_value == 1, 1), else_=0)))
        .where(_in_window(names, window))
        .group_by(t.metric_name)
    )
    return {str(name): (int(n), int(ones or 0)) for name, n, ones in conn.execute(stmt).all()}


def _durations(conn: Connection, window: UsageWindow) -> DurationStats:
    t = TaskMetrics
    value = cast(t.metric_value, Float)
    where = _in_window([DURATION_SECONDS], window)
    quantiles: list[float | None]
    if conn.dialect.name == "postgresql":
        percentiles = func.percentile_cont(postgresql.array(QUANTILES)).within_group(value)
        stmt = select(
            func.count(),
            func.avg(t.metric_value),  # NUMERIC aggregates: no per-row cast
            func.max(t.metric_value),
            type_coerce(percentiles, postgresql.ARRAY(Float)),
        ).where(where)
        count, avg, maximum, found = conn.execute(stmt).one()
        quantiles = [float(v) for v in found] if count else [None] * len(QUANTILES)
    else:
        values = [float(v) for v in conn.scalars(select(value).where(where).order_by(value))]
        count = len(values)
        avg = sum(values) / count if count else None
        maximum = values[-1] if count else None
        quantiles = [interpolated_quantile(values, q) if count else None for q in QUANTILES]
    p50, p90, p95, p99 = quantiles
    return DurationStats(
        count=int(count),
        avg=float(avg) if avg is not None else None,
        p50=p50,
        p90=p90,
        p95=p95,
        p99=p99,
        max=float(maximum) if maximum is not None else None,
    )


def _costs(conn: Connection, window: UsageWindow) -> TaskCostStats:
    t = TaskMetrics
    total: Any
    if conn.dialect.name == "postgresql":
        total = func.sum(t.metric_value) * PICO_PER_USD  # NUMERIC: exact as it is
    else:  # SQLite keeps NUMERIC as a double: round each value to the picodollar, sum integers
        total = func.sum(cast(func.round(t.metric_value * PICO_PER_USD), BigInteger))
    count, total_pico = conn.execute(
        select(func.count(), total).where(_in_window([COST_USD], window))
    ).one()
    pico = int(Decimal(total_pico).to_integral_value(ROUND_HALF_EVEN)) if total_pico else 0
    average = None
    if count:
        average_pico = (Decimal(pico) / count).to_integral_value(rounding=ROUND_HALF_EVEN)
        average = pico_to_usd(int(average_pico))
    return TaskCostStats(
        tasks_with_cost=int(count), total_usd=pico_to_usd(pico), avg_per_task_usd=average
    )


def task_metrics(session: Session, window: UsageWindow) -> TaskMetricsResponse:
    """Counts, success rate, duration percentiles and cost per task of tasks finished in
    ``window`` (the caller checks the principal is an admin)."""
    conn = session.connection()
    outcomes = _outcome_counts(conn, window)
    tasks, succeeded = outcomes.get(SUCCEEDED, (0, 0))
    by_status = {
        status: ones
        for status in TASK_STATUSES
        if (ones := outcomes.get(STATUS_PREFIX + status, (0, 0))[1])
    }
    return TaskMetricsResponse(
        window=window,
        tasks=tasks,
        succeeded=succeeded,
        failed=tasks - succeeded,
        success_rate=succeeded / tasks if tasks else None,
        by_status=by_status,
        duration_seconds=_durations(conn, window),
        cost=_costs(conn, window),
    )
