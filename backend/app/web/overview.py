"""The overview page's figures: spend today and over 7 and 30 days, daily spend by model (and by
user for administrators), the top tasks, users and models, error rate, p95 latency, unpriced
calls and the budgets that apply to the viewer.

The headline figures are the usage API's own answer (``user_usage`` for a user,
``overall_usage`` for an administrator, over 30 whole UTC days), so the page and
``/api/v1/usage`` agree to the last digit; the chart series come from the same rollups.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from app.access.principal import Principal
from app.budgets import limits as budget_limits
from app.core.config import Settings
from app.core.money import pico_to_usd
from app.models import BudgetScope
from app.schemas.usage import ModelUsage, UsageBreakdowns, UsageTotals
from app.usage import report as usage_report
from app.web import queries
from app.web.budgets import Budget
from app.web.cache import ClosedDaysCache

WINDOW_DAYS = 30
TOP = 5
CHART_SERIES = 8  # series drawn in a stacked chart; the rest are summed as "other"


@dataclass(frozen=True, slots=True)
class TopTask:
    task_id: str
    user_id: str
    cost_usd: Decimal
    calls: int


@dataclass(frozen=True, slots=True)
class TopUser:
    user_id: str
    cost_usd: Decimal


@dataclass
class Overview:
    window_since: date
    window_until: date  # exclusive
    today_usd: Decimal
    week_usd: Decimal
    month_usd: Decimal
    totals: UsageTotals
    by_model: list[ModelUsage]
    unpriced_models: list[str]
    top_tasks: list[TopTask]
    top_users: list[TopUser]
    budgets: list[Budget]
    chart_by_model: dict[str, Any]
    chart_by_user: dict[str, Any] | None = None
    scope: str = "yours"

    @property
    def error_rate(self) -> float | None:
        requests = self.totals.requests
        return self.totals.errors / requests if requests else None


def _top_tasks_of(cells: list[queries.SpendCell]) -> list[TopTask]:
    """The most expensive tasks of ``cells`` (one user's: a few hundred rows a month)."""
    cost: dict[str, int] = defaultdict(int)
    calls: dict[str, int] = defaultdict(int)
    owner: dict[str, str] = {}
    for _, user, task, pico, requests in cells:
        if task:
            cost[task] += pico
            calls[task] += requests
            owner[task] = max(owner.get(task, ""), user)
    ranked = sorted(cost.items(), key=lambda item: (-item[1], item[0]))[:TOP]
    return [TopTask(t, owner[t], pico_to_usd(c), calls[t]) for t, c in ranked]


def build_overview(
    session: Session,
    settings: Settings,
    principal: Principal,
    now: datetime | None = None,
    *,
    closed_days: ClosedDaysCache | None = None,
) -> Overview:
    """The viewer's overview; an administrator's spend per user of the days that have ended
    comes from ``closed_days`` when given (today's is always read). Everyone's top tasks are
    ranked from the per-task totals (``queries.top_task_spend``, a few rows read), a user's
    from their own per-task rows."""
    now = now or datetime.now(UTC)
    window = usage_report.usage_window(WINDOW_DAYS, now)
    since, until = window.since.date(), window.until.date()
    today = until - timedelta(days=1)
    conn = session.connection()
    report: UsageBreakdowns
    if principal.is_admin:
        report = usage_report.overall_usage(session, window)
        user_filter: str | None = None
    else:
        report = usage_report.user_usage(session, principal, principal.user_id, window)
        user_filter = principal.user_id
    by_day = {d.day: d.cost_usd for d in report.by_day}
    days = [since + timedelta(days=i) for i in range(WINDOW_DAYS)]
    model_day = queries.rollup_groups(
        conn, ("day", "model"), since, until, user_id=user_filter, cost_only=True
    )
    if principal.is_admin:
        # Everyone's: the top tasks from the per-task totals (a few rows read), spend by user
        # and day from the per-user rollup (a row per user, day and model), not a row per task.
        top_tasks = [
            TopTask(task, user, pico_to_usd(cost), calls)
            for task, user, cost, calls in queries.top_task_spend(conn, since, until, TOP)
        ]
        if closed_days is not None:
            ended = closed_days.get(
                ("overview-user-spend", since, today),
                lambda: queries.user_spend(conn, since, today),
            )
            per_user = _merged(ended, queries.user_spend(conn, today, until))
        else:
            per_user = queries.user_spend(conn, since, until)
        ranked = sorted(per_user.items(), key=lambda item: (-item[1], _user_label(item[0])))
        top_users = [TopUser(_user_label(u), pico_to_usd(c)) for u, c in ranked[:TOP]]
        chart_by_user: dict[str, Any] | None = _stacked_users(
            conn, days, [u for u, _ in ranked], by_day
        )
    else:
        cells = queries.spend_cells(conn, since, until, user_id=user_filter)
        top_tasks, top_users, chart_by_user = _top_tasks_of(cells), [], None
    overview = Overview(
        window_since=since,
        window_until=until,
        today_usd=by_day.get(today, Decimal(0)),
        week_usd=sum((c for d, c in by_day.items() if d > today - timedelta(days=7)), Decimal(0)),
        month_usd=report.totals.cost_usd,
        totals=report.totals,
        by_model=report.by_model,
        unpriced_models=[m.model for m in report.by_model if m.unpriced_calls],
        top_tasks=top_tasks,
        top_users=top_users,
        budgets=_budgets(session, settings, principal),
        chart_by_model=_stacked(days, {(d, m): s.cost_pico_usd for (d, m), s in model_day}),
        chart_by_user=chart_by_user,
        scope="everyone's" if principal.is_admin else "yours",
    )
    return overview


def _user_label(user_id: str) -> str:
    return user_id or "(none)"


def _merged(*parts: dict[str, int]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for part in parts:  # a kept part is shared: never changed
        for user, pico in part.items():
            merged[user] = merged.get(user, 0) + pico
    return merged


def _stacked_users(
    conn: Connection, days: list[date], ranked: list[str], by_day: dict[date, Decimal]
) -> dict[str, Any]:
    """Everyone's daily spend stacked by user, as ``_stacked`` draws it: the ``CHART_SERIES``
    users who spent the most (``ranked``: most first), each day's rest as "other" (the day's
    total, ``by_day``, less theirs). Only the shown users' days are read."""
    shown = ranked[:CHART_SERIES]
    cells = queries.users_daily_spend(conn, shown, days[0], days[-1] + timedelta(days=1))
    index = {d: i for i, d in enumerate(days)}
    points = {u: [0] * len(days) for u in shown}
    for (day, user), pico in cells.items():
        at = index.get(day)
        if at is not None:
            points[user][at] += pico
    datasets = [{"label": _user_label(u), "data": [_dollars(p) for p in points[u]]} for u in shown]
    if len(ranked) > CHART_SERIES:
        other = [
            int(by_day.get(day, Decimal(0)) * 10**12) - sum(points[u][i] for u in shown)
            for i, day in enumerate(days)
        ]
        datasets.append({"label": "other", "data": [_dollars(p) for p in other]})
    return {"labels": [d.isoformat() for d in days], "datasets": datasets}


def _budgets(session: Session, settings: Settings, principal: Principal) -> list[Budget]:
    daily, monthly = budget_limits.user_status(session, settings, principal.user_id)
    budgets = [
        Budget(f"{principal.user_id}, today (UTC)", daily),
        Budget(f"{principal.user_id}, this month (UTC)", monthly),
    ]
    if principal.is_admin:
        status = budget_limits.scope_status(session, settings, BudgetScope.GLOBAL_DAILY, "")
        budgets.insert(0, Budget("Everyone, today (UTC)", status))
    return budgets


def _stacked(days: list[date], cells: dict[tuple[date, str], int]) -> dict[str, Any]:
    """Chart.js data: one dataset per series (the most expensive first, the tail summed as
    "other"), one point per day, in dollars. Floats: for drawing only; tables show decimals."""
    totals: dict[str, int] = defaultdict(int)
    for (_, series), pico in cells.items():
        totals[series] += pico
    ranked = sorted(totals.items(), key=lambda item: (-item[1], item[0]))
    shown = [s for s, _ in ranked[:CHART_SERIES]]
    index = {d: i for i, d in enumerate(days)}
    points = {s: [0] * len(days) for s in shown}
    other = [0] * len(days)
    for (day, series), pico in cells.items():
        at = index.get(day)
        if at is not None:
            points.get(series, other)[at] += pico
    datasets = [{"label": s, "data": [_dollars(p) for p in points[s]]} for s in shown]
    if len(ranked) > CHART_SERIES:
        datasets.append({"label": "other", "data": [_dollars(p) for p in other]})
    return {"labels": [d.isoformat() for d in days], "datasets": datasets}


def _dollars(pico: int) -> float:
    return pico / 10**12
