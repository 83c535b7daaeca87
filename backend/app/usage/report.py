"""Usage reports: what a task, a user or everyone spent, with breakdowns by model, day, provider,
operation (the OpenAI API called) and, for a task, agent.

Figures come from the daily rollups only (``usage_queries.rollup_usage_groups``: the per-task
rollup for a task, the per-user one for a user, the overall one for everyone), so a report
costs an index range scan however many calls there were. Rules a caller may rely on:

- Windows are whole UTC calendar days: ``days=N`` is ``[00:00 UTC of today-(N-1), 00:00 UTC of
  tomorrow)``, reported as ``window.since``/``window.until``. Daily rollups make this exact;
  a rolling "now minus N x 24 h" window could only be approximated from them.
- ``requests = successes + errors + blocked``; latency figures cover every recorded call (a
  blocked call records the few milliseconds until it was refused).
- ``p95_latency_ms`` is estimated from the rollup's latency histogram by linear interpolation
  inside the bucket holding the rank, exactly as Prometheus' ``histogram_quantile`` does; it is
  accurate to the bucket's width. When the rank falls in the overflow bucket (> 120 s) the
  estimate is the last finite bound, 120 000 ms.
- A task is "unknown" (``NotFound``) when the rollup holds no call for it, and to anyone but
  an admin when its calls were not all made for the caller (no existence oracle).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Literal, TypeVar

from sqlalchemy.orm import Session

from app.access.principal import Principal
from app.core.errors import NotFound
from app.core.money import pico_to_usd
from app.models import LATENCY_BUCKETS_MS
from app.schemas.usage import (
    AgentUsage,
    DayUsage,
    ModelUsage,
    OperationUsage,
    OverallUsageResponse,
    ProviderUsage,
    TaskUsageResponse,
    UsageTotals,
    UsageWindow,
    UserUsageResponse,
)
from app.usage import queries as usage_queries
from app.usage.queries import UsageGroup, UsageSums

MIN_DAYS = 1
MAX_DAYS = 365

Source = Literal["rollup", "raw"]


def usage_window(days: int, now: datetime) -> UsageWindow:
    """The ``days`` whole UTC days ending with the day of ``now``."""
    if not MIN_DAYS <= days <= MAX_DAYS:
        raise ValueError(f"days must be from {MIN_DAYS} to {MAX_DAYS}, got {days}")
    today = now.astimezone(UTC).date()
    return UsageWindow(
        days=days,
        since=datetime.combine(today - timedelta(days=days - 1), time(), UTC),
        until=datetime.combine(today + timedelta(days=1), time(), UTC),
    )


def histogram_quantile(
    q: float, buckets: Sequence[int], bounds: Sequence[float] = LATENCY_BUCKETS_MS
) -> float | None:
    """The ``q``-quantile of a histogram of non-cumulative ``buckets`` with upper ``bounds``.

    Prometheus' method: find the bucket holding rank ``q * count``, interpolate linearly between
    its lower and upper bound (the first bucket starts at 0). The last bucket is the overflow.
    """
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    cumulative = 0
    for index, count in enumerate(buckets):
        if count and cumulative + count >= rank:
            if index >= len(bounds):
                return float(bounds[-1])
            lower = float(bounds[index - 1]) if index else 0.0
            upper = float(bounds[index])
            return lower + (upper - lower) * (rank - cumulative) / count
        cumulative += count
    return float(bounds[-1])  # only reached for q > 1


def _totals(sums: UsageSums) -> dict[str, object]:
    counts = sums.counts()
    del counts["cost_pico_usd"]
    return {
        **counts,
        "cost_usd": pico_to_usd(sums.cost_pico_usd),
        "avg_latency_ms": sums.latency_ms_sum / sums.requests if sums.requests else None,
        "p95_latency_ms": histogram_quantile(0.95, sums.latency_buckets),
    }


K = TypeVar("K", str, date)


def _sum_by(groups: Iterable[UsageGroup], key: Callable[[UsageGroup], K]) -> dict[K, UsageSums]:
    parts: dict[K, list[UsageSums]] = {}
    for group in groups:
        parts.setdefault(key(group), []).append(group.sums)
    return {k: UsageSums.total(sums) for k, sums in parts.items()}


def _most_expensive_first(sums: dict[str, UsageSums]) -> list[tuple[str, UsageSums]]:
    return sorted(sums.items(), key=lambda item: (-item[1].cost_pico_usd, item[0]))


def _breakdowns(groups: list[UsageGroup]) -> dict[str, object]:
    by_model_sums = _sum_by(groups, lambda g: g.model)
    total = UsageSums.total(by_model_sums.values())
    by_model = _most_expensive_first(by_model_sums)
    by_day = sorted(_sum_by(groups, lambda g: g.day).items())
    by_provider = _most_expensive_first(_sum_by(groups, lambda g: g.provider))
    by_operation = _most_expensive_first(_sum_by(groups, lambda g: g.operation))
    return {
        "totals": UsageTotals.model_validate(_totals(total)),
        "by_model": [ModelUsage.model_validate({"model": m, **_totals(s)}) for m, s in by_model],
        "by_day": [DayUsage.model_validate({"day": d, **_totals(s)}) for d, s in by_day],
        "by_provider": [
            ProviderUsage.model_validate({"provider": p or None, **_totals(s)})
            for p, s in by_provider
        ],
        "by_operation": [
            OperationUsage.model_validate({"operation": o or None, **_totals(s)})
            for o, s in by_operation
        ],
    }


def _groups(
    session: Session,
    source: Source,
    *,
    task_id: str | None = None,
    user_id: str | None = None,
    window: UsageWindow | None = None,
    by_agent: bool = False,
) -> list[UsageGroup]:
    conn = session.connection()
    if source == "raw":
        return usage_queries.raw_usage_groups(
            conn,
            task_id=task_id,
            user_id=user_id,
            since=window.since if window else None,
            until=window.until if window else None,
            by_agent=by_agent,
        )
    return usage_queries.rollup_usage_groups(
        conn,
        task_id=task_id,
        user_id=user_id,
        since_day=window.since.date() if window else None,
        until_day=window.until.date() if window else None,
        by_agent=by_agent,
    )


def authorize_task(session: Session, principal: Principal, task_id: str) -> list[str]:
    """The task's user ids, if ``principal`` may read the task.

    ``NotFound`` when no call was recorded for it, and, with the very same answer, unless the
    principal is an admin or every call of the task was made for the principal: another user's
    task is indistinguishable from one that does not exist.
    """
    user_ids = usage_queries.task_user_ids(session.connection(), task_id)
    if user_ids is None or (not principal.is_admin and user_ids != [principal.user_id]):
        raise NotFound(f"No usage recorded for task {task_id!r}.")
    return user_ids


def task_usage(
    session: Session, principal: Principal, task_id: str, *, source: Source = "rollup"
) -> TaskUsageResponse:
    """Everything the task's calls cost, over the task's whole life."""
    user_ids = authorize_task(session, principal, task_id)
    groups = _groups(session, source, task_id=task_id, by_agent=True)
    by_agent = _most_expensive_first(_sum_by(groups, lambda g: g.agent))
    return TaskUsageResponse.model_validate(
        {
            "task_id": task_id,
            "user_ids": user_ids,
            **_breakdowns(groups),
            "by_agent": [
                AgentUsage.model_validate({"agent": a or None, **_totals(s)}) for a, s in by_agent
            ],
        }
    )


def user_usage(
    session: Session,
    principal: Principal,
    user_id: str,
    window: UsageWindow,
    *,
    source: Source = "rollup",
) -> UserUsageResponse:
    """The user's calls in ``window``; a user reads only their own, an admin anyone's."""
    principal.ensure_can_read_user(user_id)
    groups = _groups(session, source, user_id=user_id, window=window)
    return UserUsageResponse.model_validate(
        {"user_id": user_id, "window": window, **_breakdowns(groups)}
    )


def overall_usage(
    session: Session, window: UsageWindow, *, source: Source = "rollup"
) -> OverallUsageResponse:
    """Every call in ``window`` (the caller checks the principal is an admin)."""
    groups = _groups(session, source, window=window)
    return OverallUsageResponse.model_validate({"window": window, **_breakdowns(groups)})
