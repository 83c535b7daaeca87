"""The overview page's figures: spend today and over 7 and 30 days, daily spend by model (and by
user for administrators), the top tasks, users and models, error rate, p95 latency, unpriced
calls and the budgets that apply to the viewer.

The headline figures are the usage API's own answer (``user_usage`` for a user,
``overall_usage`` for an administrator, over 30 whole UTC days), so the page and
``/api/v1/usage`` agree to the last digit; the chart series come from the same rollups.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

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


@dataclass
class SpendShares:
    """Who and which tasks the spend of some days went to, in picodollars."""

    per_task: dict[str, int] = field(default_factory=dict)
    task_calls: dict[str, int] = field(default_factory=dict)
    task_user: dict[str, str] = field(default_factory=dict)
    per_user: dict[str, int] = field(default_factory=dict)
    user_day: dict[tuple[date, str], int] = field(default_factory=dict)

    @classmethod
    def of(cls, cells: list[queries.SpendCell]) -> SpendShares:
        shares = cls()
        shares.add(cells)
        return shares

    def add(self, cells: list[queries.SpendCell]) -> None:
        per_task, calls, owner = self.per_task, self.task_calls, self.task_user
        per_user, user_day = self.per_user, self.user_day
        for day, user, task, cost, requests in cells:
            if task:
                per_task[task] = per_task.get(task, 0) + cost
                calls[task] = calls.get(task, 0) + requests
                owner[task] = max(owner.get(task, ""), user)
            user = user or "(none)"
            per_user[user] = per_user.get(user, 0) + cost
            user_day[(day, user)] = user_day.get((day, user), 0) + cost

    def plus(self, cells: list[queries.SpendCell]) -> SpendShares:
        """A copy with ``cells`` added (this one may be shared: it is never changed)."""
        merged = SpendShares(
            dict(self.per_task),
            dict(self.task_calls),
            dict(self.task_user),
            dict(self.per_user),
            dict(self.user_day),
        )
        merged.add(cells)
        return merged

    def top_tasks(self) -> list[TopTask]:
        ranked = sorted(self.per_task.items(), key=lambda item: (-item[1], item[0]))[:TOP]
        return [
            TopTask(t, self.task_user[t], pico_to_usd(c), self.task_calls[t]) for t, c in ranked
        ]

    def top_users(self) -> list[TopUser]:
        ranked = sorted(self.per_user.items(), key=lambda item: (-item[1], item[0]))[:TOP]
        return [TopUser(u, pico_to_usd(c)) for u, c in ranked]


def build_overview(
    session: Session,
    settings: Settings,
    principal: Principal,
    now: datetime | None = None,
    *,
    closed_days: ClosedDaysCache | None = None,
) -> Overview:
    """The viewer's overview; an administrator's spend by user and task of the days that have
    ended comes from ``closed_days`` when given (today's is always read)."""
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
    if principal.is_admin and closed_days is not None:
        ended = closed_days.get(
            ("overview-spend", since, today),
            lambda: SpendShares.of(queries.spend_cells(conn, since, today)),
        )
        shares = ended.plus(queries.spend_cells(conn, today, until))
    else:
        shares = SpendShares.of(queries.spend_cells(conn, since, until, user_id=user_filter))
    overview = Overview(
        window_since=since,
        window_until=until,
        today_usd=by_day.get(today, Decimal(0)),
        week_usd=sum((c for d, c in by_day.items() if d > today - timedelta(days=7)), Decimal(0)),
        month_usd=report.totals.cost_usd,
        totals=report.totals,
        by_model=report.by_model,
        unpriced_models=[m.model for m in report.by_model if m.unpriced_calls],
        top_tasks=shares.top_tasks(),
        top_users=shares.top_users() if principal.is_admin else [],
        budgets=_budgets(session, settings, principal),
        chart_by_model=_stacked(days, {(d, m): s.cost_pico_usd for (d, m), s in model_day}),
        chart_by_user=_stacked(days, shares.user_day) if principal.is_admin else None,
        scope="everyone's" if principal.is_admin else "yours",
    )
    return overview


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
