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


def _figures(conn: Connection, window: UsageWindow) -> dict[str, tuple[Any, ...]]:
    """Per metric name in the window: (rows, rows valued 1, avg, max, sum in picodollars);
    one index range scan per name, one round trip."""
    t = TaskMetrics
    names = [SUCCEEDED, DURATION_SECONDS, COST_USD, *(STATUS_PREFIX + s for s in TASK_STATUSES)]
    pico_sum: Any
    if conn.dialect.name == "postgresql":
        pico_sum = func.sum(t.metric_value) * PICO_PER_USD  # NUMERIC: exact as it is
    else:  # SQLite keeps NUMERIC as a double: round each value to the picodollar, sum integers
        pico_sum = func.sum(cast(func.round(t.metric_value * PICO_PER_USD), BigInteger))
    stmt = (
        select(
            t.metric_name,
            func.count(),
            func.sum(case((t.metric_value == 1, 1), else_=0)),
            func.avg(t.metric_value),
            func.max(t.metric_value),
            pico_sum,
        )
        .where(_in_window(names, window))
        .group_by(t.metric_name)
    )
    return {str(name): tuple(rest) for name, *rest in conn.execute(stmt).all()}


def _duration_quantiles(conn: Connection, window: UsageWindow) -> list[float]:
    t = TaskMetrics
    value = cast(t.metric_value, Float)
    where = _in_window([DURATION_SECONDS], window)
    if conn.dialect.name == "postgresql":
        percentiles = func.percentile_cont(postgresql.array(QUANTILES)).within_group(value)
        stmt = select(type_coerce(percentiles, postgresql.ARRAY(Float))).where(where)
        return [float(v) for v in conn.execute(stmt).scalar_one()]
    values = [float(v) for v in conn.scalars(select(value).where(where).order_by(value))]
    return [interpolated_quantile(values, q) for q in QUANTILES]


def task_metrics(session: Session, window: UsageWindow) -> TaskMetricsResponse:
    """Counts, success rate, duration percentiles and cost per task of tasks finished in
    ``window`` (the caller checks the principal is an admin)."""
    conn = session.connection()
    f = _figures(conn, window)
    none: tuple[Any, ...] = (0, 0, None, None, None)
    tasks, succeeded = int(f.get(SUCCEEDED, none)[0]), int(f.get(SUCCEEDED, none)[1])
    by_status = {
        status: int(f[STATUS_PREFIX + status][1])
        for status in TASK_STATUSES
        if STATUS_PREFIX + status in f and f[STATUS_PREFIX + status][1]
    }
    durations, duration_avg, duration_max = (f.get(DURATION_SECONDS, none)[i] for i in (0, 2, 3))
    p50, p90, p95, p99 = _duration_quantiles(conn, window) if durations else [None] * len(QUANTILES)
    costs = int(f.get(COST_USD, none)[0])
    total = f.get(COST_USD, none)[4]
    total_pico = int(Decimal(total).to_integral_value(ROUND_HALF_EVEN)) if total else 0
    average = None
    if costs:
        average_pico = (Decimal(total_pico) / costs).to_integral_value(rounding=ROUND_HALF_EVEN)
        average = pico_to_usd(int(average_pico))
    return TaskMetricsResponse(
        window=window,
        tasks=tasks,
        succeeded=succeeded,
        failed=tasks - succeeded,
        success_rate=succeeded / tasks if tasks else None,
        by_status=by_status,
        duration_seconds=DurationStats(
            count=int(durations),
            avg=float(duration_avg) if duration_avg is not None else None,
            p50=p50,
            p90=p90,
            p95=p95,
            p99=p99,
            max=float(duration_max) if duration_max is not None else None,
        ),
        cost=TaskCostStats(
            tasks_with_cost=costs, total_usd=pico_to_usd(total_pico), avg_per_task_usd=average
        ),
    )
