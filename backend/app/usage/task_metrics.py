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
written too; this report ignores them. Write them with ``task_store.write_task_metrics``: it
records a (task, metric) pair once and adds it to ``task_metrics_daily``, the per-UTC-day rollup
the report reads, in the same transaction.

Figures (from the rollup, the default): counts, success rate, the average and maximum duration
and the costs are exact (costs are summed as integer picodollars; the average per task is rounded
half-even to the picodollar). Duration percentiles are estimated from the rollup's duration
histogram (``DURATION_BUCKETS_SECONDS``) by linear interpolation inside the bucket holding the
rank, as Prometheus' ``histogram_quantile`` does, and capped at the maximum; they are accurate to
the bucket's width (at most a third of its upper bound from 1 minute to 1 hour).
``source="raw"`` computes the same report from the ``task_metrics`` rows (``bench/`` compares
the two), with exact percentiles interpolated between ranks like PostgreSQL's
``percentile_cont``.

Cost per succeeded task and per phase (both sources; exact, in picodollars until the end):

- ``per_succeeded_task_usd``: the ``cost_usd`` of the tasks whose ``succeeded`` row is 1, over
  their number (the unit cost of a fixed bug; failures are in ``total_usd``);
- ``by_phase``: the finished tasks' spend per agent label from ``usage_rollup_daily``
  (``FixAgent``, ``TestGenerator``, ``CodeAgent``, which applies the fixes, ...), and
  ``retries``: the spend of every call of a task from the start of its second fix attempt on
  (the orchestrator's ``attempt 2: asking FixAgent for a fix`` step event), i.e. what fix
  attempts after the first cost, FixAgent's and CodeAgent's calls alike. It overlaps the
  agents' figures (it is part of them), so the phases do not add up to the total. The SDK's
  own retries of one call are not in it (they are one row: ``attempts`` of the usage rows,
  the recommendations' "retried calls").
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, Literal, NamedTuple

from sqlalchemy import (
    BigInteger,
    Connection,
    Date,
    Float,
    and_,
    bindparam,
    case,
    cast,
    func,
    select,
    type_coerce,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from app.core.money import PICO_PER_USD, pico_to_usd
from app.models import (
    DURATION_BUCKETS_SECONDS,
    LLMUsage,
    TaskEvent,
    TaskMetrics,
    TaskMetricsDaily,
    UsageRollupDaily,
)
from app.schemas.usage import (
    DurationStats,
    TaskCostStats,
    TaskMetricsResponse,
    TaskPhaseCost,
    UsageWindow,
)
from app.tasks.metrics_writer import (
    COST_USD,
    DURATION_BUCKET_COLUMNS,
    DURATION_SECONDS,
    ROLLUP_SUMS,
    STATUS_PREFIX,
    SUCCEEDED,
    TASK_STATUSES,
    fix_attempt_step,
)
from app.usage.report import histogram_quantile

QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.95, 0.99)

Source = Literal["rollup", "raw"]


class _Figures(NamedTuple):
    tasks: int
    succeeded: int
    by_status: dict[str, int]
    durations: DurationStats
    cost: TaskCostStats


def _cost_stats(count: int, pico: int) -> TaskCostStats:
    average = None
    if count:
        average_pico = (Decimal(pico) / count).to_integral_value(rounding=ROUND_HALF_EVEN)
        average = pico_to_usd(int(average_pico))
    return TaskCostStats(
        tasks_with_cost=int(count), total_usd=pico_to_usd(pico), avg_per_task_usd=average
    )


# -- from the daily task rollup --------------------------------------------------------------


@functools.cache
def _rollup_statement() -> Any:
    """Built once: the compiled-statement cache then serves every call."""
    d = TaskMetricsDaily.__table__.c
    sums = (
        cast(func.coalesce(func.sum(d[n]), 0), Float if n == "duration_sum" else BigInteger)
        for n in ROLLUP_SUMS
    )
    return select(*sums, func.coalesce(func.max(d.duration_max), 0.0)).where(
        d.day >= bindparam("since_day", type_=Date), d.day < bindparam("until_day", type_=Date)
    )


def estimated_quantile(q: float, buckets: Sequence[int], maximum: float) -> float | None:
    """The ``q``-quantile of a duration histogram, interpolated inside its bucket (the overflow
    bucket ends at ``maximum``) and never above ``maximum``."""
    bounds = (*DURATION_BUCKETS_SECONDS, max(maximum, DURATION_BUCKETS_SECONDS[-1]))
    estimate = histogram_quantile(q, buckets, bounds)
    return None if estimate is None else min(estimate, maximum)


def _from_rollup(conn: Connection, window: UsageWindow) -> _Figures:
    row = conn.execute(
        _rollup_statement(),
        {"since_day": window.since.date(), "until_day": window.until.date()},
    ).one()
    sums: dict[str, Any] = dict(zip(ROLLUP_SUMS, row, strict=False))
    maximum = float(row[-1])
    count = int(sums["duration_count"])
    buckets = [int(sums[name]) for name in DURATION_BUCKET_COLUMNS]
    quantiles = [estimated_quantile(q, buckets, maximum) for q in QUANTILES]
    p50, p90, p95, p99 = quantiles
    durations = DurationStats(
        count=count,
        avg=float(sums["duration_sum"]) / count if count else None,
        p50=p50,
        p90=p90,
        p95=p95,
        p99=p99,
        max=maximum if count else None,
    )
    by_status = {s: n for s in TASK_STATUSES if (n := int(sums[f"status_{s}"]))}
    return _Figures(
        tasks=int(sums["tasks"]),
        succeeded=int(sums["succeeded"]),
        by_status=by_status,
        durations=durations,
        cost=_cost_stats(int(sums["cost_tasks"]), int(sums["cost_pico_usd"])),
    )


# -- from the task_metrics rows ----------------------------------------------------------------


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
    return _cost_stats(int(count), pico)


def _from_rows(conn: Connection, window: UsageWindow) -> _Figures:
    outcomes = _outcome_counts(conn, window)
    tasks, succeeded = outcomes.get(SUCCEEDED, (0, 0))
    by_status = {
        status: ones
        for status in TASK_STATUSES
        if (ones := outcomes.get(STATUS_PREFIX + status, (0, 0))[1])
    }
    return _Figures(
        tasks=tasks,
        succeeded=succeeded,
        by_status=by_status,
        durations=_durations(conn, window),
        cost=_costs(conn, window),
    )


# -- cost per succeeded task and per phase ----------------------------------------------------

RETRIES = "retries"
# The step event the orchestrator records when a task's second fix attempt starts.
SECOND_ATTEMPT_STARTED = fix_attempt_step(2)


def _exact_pico(conn: Connection, value: Any) -> Any:
    """The sum of ``cost_usd`` values in picodollars, exactly on either dialect."""
    if conn.dialect.name == "postgresql":
        return func.sum(value) * PICO_PER_USD  # NUMERIC: exact as it is
    return func.sum(cast(func.round(value * PICO_PER_USD), BigInteger))  # SQLite: doubles


def _finished(window: UsageWindow) -> Any:
    """The ``succeeded`` rows of the tasks finished in ``window``."""
    return (
        select(TaskMetrics.task_id, TaskMetrics.metric_value)
        .where(_in_window([SUCCEEDED], window))
        .subquery("finished")
    )


def _succeeded_cost(conn: Connection, window: UsageWindow) -> tuple[int, int]:
    """(succeeded tasks with a cost row, their cost in picodollars)."""
    finished = _finished(window)
    cost = TaskMetrics
    count, total = conn.execute(
        select(func.count(), _exact_pico(conn, cost.metric_value))
        .select_from(finished)
        .join(cost, and_(cost.task_id == finished.c.task_id, cost.metric_name == COST_USD))
        .where(finished.c.metric_value == 1)
    ).one()
    return int(count), int(Decimal(total).to_integral_value(ROUND_HALF_EVEN)) if total else 0


def _phase_costs(conn: Connection, window: UsageWindow) -> list[TaskPhaseCost]:
    finished = _finished(window)
    r = UsageRollupDaily
    by_agent = conn.execute(
        select(
            r.agent,
            func.count(func.distinct(r.task_id)),
            cast(func.coalesce(func.sum(r.cost_pico_usd), 0), BigInteger),
        )
        .select_from(finished)
        .join(r, r.task_id == finished.c.task_id)
        .group_by(r.agent)
    ).all()
    e, u = TaskEvent, LLMUsage
    retried = (
        select(e.task_id, func.min(e.timestamp).label("started"))
        .select_from(finished)
        .join(e, e.task_id == finished.c.task_id)
        .where(e.kind == "step", e.message == SECOND_ATTEMPT_STARTED)
        .group_by(e.task_id)
        .subquery("retried")
    )
    tasks, pico = conn.execute(
        select(
            func.count(func.distinct(u.task_id)),
            cast(func.coalesce(func.sum(u.cost_pico_usd), 0), BigInteger),
        )
        .select_from(retried)
        .join(u, and_(u.task_id == retried.c.task_id, u.timestamp >= retried.c.started))
    ).one()
    phases = [
        TaskPhaseCost(phase=str(agent) or "(none)", tasks=int(n), total_usd=pico_to_usd(int(p)))
        for agent, n, p in sorted(by_agent, key=lambda row: str(row[0]))
    ]
    phases.append(TaskPhaseCost(phase=RETRIES, tasks=int(tasks), total_usd=pico_to_usd(int(pico))))
    return phases


def _with_breakdown(conn: Connection, window: UsageWindow, cost: TaskCostStats) -> TaskCostStats:
    count, pico = _succeeded_cost(conn, window)
    per_task = _cost_stats(count, pico).avg_per_task_usd
    return cost.model_copy(
        update={
            "succeeded_tasks_with_cost": count,
            "succeeded_total_usd": pico_to_usd(pico),
            "per_succeeded_task_usd": per_task,
            "by_phase": _phase_costs(conn, window),
        }
    )


def task_metrics(
    session: Session, window: UsageWindow, *, source: Source = "rollup"
) -> TaskMetricsResponse:
    """Counts, success rate, duration percentiles and cost per task of tasks finished in
    ``window`` (the caller checks the principal is an admin)."""
    conn = session.connection()
    figures = (_from_rollup if source == "rollup" else _from_rows)(conn, window)
    return TaskMetricsResponse(
        window=window,
        tasks=figures.tasks,
        succeeded=figures.succeeded,
        failed=figures.tasks - figures.succeeded,
        success_rate=figures.succeeded / figures.tasks if figures.tasks else None,
        by_status=figures.by_status,
        duration_seconds=figures.durations,
        cost=_with_breakdown(conn, window, figures.cost),
    )
