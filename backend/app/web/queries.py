"""The console's reads that no API endpoint makes: filtered task pages, a task's calls in
order, rollup sums grouped by user or task, and everyone's most expensive tasks.

Every figure of spend comes from the rollups (``usage_rollup_daily`` per task and day,
``usage_rollup_user_daily`` per user, ``usage_rollup_daily_overall`` for everyone,
``usage_rollup_task_total`` per task over all time), as the usage reports' do, so a page costs
an index range scan whatever the number of calls. Visibility is
the API's: a user's reads are restricted to their own ``user_id`` here, in the query, never
after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal

from sqlalchemy import BigInteger, Connection, Float, and_, cast, func, or_, select, union_all
from sqlalchemy.orm import Session, defer

from app.access.principal import Principal
from app.models import (
    TASK_STATUSES,
    LLMUsage,
    Task,
    UsageRollupDaily,
    UsageRollupTaskTotal,
    UsageRollupUserDaily,
)
from app.usage.queries import SUM_FIELDS, UsageSums, rollup_table

Dimension = Literal["user", "task", "model", "agent", "provider", "operation", "day"]
_COLUMNS: dict[Dimension, str] = {
    "user": "user_id", "task": "task_id", "model": "model", "agent": "agent",
    "provider": "provider", "operation": "operation", "day": "day",
}  # fmt: skip
MAX_TASK_CALLS = 2000


@dataclass(frozen=True, slots=True)
class TaskFilter:
    status: str | None = None
    user_id: str | None = None  # administrators only; a user always sees their own
    repo: str | None = None  # a substring of the repository URL


@dataclass(frozen=True, slots=True)
class TaskCursor:
    """Where a page of the task list starts: after the task (``created_at``, ``task_id``) in
    newest-first order. Pages by cursor cost the same at any depth, unlike an OFFSET."""

    created_at: datetime
    task_id: str

    def encode(self) -> str:
        return f"{_as_utc(self.created_at).isoformat()}~{self.task_id}"

    @classmethod
    def decode(cls, text: str) -> TaskCursor:
        """``ValueError`` for anything but what ``encode`` makes."""
        stamp, _, task_id = text.partition("~")
        if not task_id or len(task_id) > 64:
            raise ValueError("not a task list cursor")
        return cls(_as_utc(datetime.fromisoformat(stamp)), task_id)


@dataclass(frozen=True, slots=True)
class TaskPage:
    rows: Sequence[Task]
    total: int | None  # None: not counted (a substring filter would read every row to count)
    older: TaskCursor | None  # where the next page starts; None: this is the last


def list_tasks(
    session: Session,
    principal: Principal,
    flt: TaskFilter,
    limit: int,
    before: TaskCursor | None = None,
) -> TaskPage:
    """A page of the tasks ``principal`` may see (``app.tasks.store.list_tasks``' rule), newest
    first, from ``before`` on, and how many match. The large text columns are not loaded.

    Every page is read in index order and stops after ``limit`` rows: through ``(user_id,
    created_at)`` for one user's tasks, ``(status, created_at)`` for one status, and for all
    statuses one such ordered scan per status, merged (the schema has no index on
    ``created_at`` alone, so an unfiltered ``ORDER BY created_at`` would sort every row).
    """
    conditions: list[Any] = []
    if not principal.is_admin:
        conditions.append(Task.user_id == principal.user_id)
    elif flt.user_id:
        conditions.append(Task.user_id == flt.user_id)
    if flt.status:
        conditions.append(Task.status == flt.status)
    if flt.repo:
        conditions.append(Task.repo_url.contains(flt.repo, autoescape=True))
    total = None
    if flt.repo is None:  # the others are counted from an index
        total = int(session.scalar(select(func.count()).select_from(Task).where(*conditions)) or 0)
    paged = list(conditions)
    if before is not None:
        paged.append(
            or_(
                Task.created_at < before.created_at,
                and_(Task.created_at == before.created_at, Task.id > before.task_id),
            )
        )
    newest = (Task.created_at.desc(), Task.id)
    if flt.status or not principal.is_admin or flt.user_id:
        ids: Any = select(Task.id).where(*paged).order_by(*newest).limit(limit + 1)
    else:
        branches = [
            select(Task.id, Task.created_at)
            .where(Task.status == status, *paged)
            .order_by(*newest)
            .limit(limit + 1)
            .subquery()
            for status in TASK_STATUSES
        ]
        merged = union_all(*(select(b.c.id, b.c.created_at) for b in branches)).subquery()
        ids = select(merged.c.id).order_by(merged.c.created_at.desc(), merged.c.id)
        ids = ids.limit(limit + 1)
    page_ids = list(session.scalars(ids))
    found = {
        task.id: task
        for task in session.scalars(
            select(Task)
            .options(defer(Task.diff), defer(Task.tests_before), defer(Task.tests_after))
            .where(Task.id.in_(page_ids[:limit]))
        )
    }
    rows = [found[i] for i in page_ids[:limit] if i in found]
    older = TaskCursor(rows[-1].created_at, rows[-1].id) if len(page_ids) > limit else None
    return TaskPage(rows=rows, total=total, older=older)


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def task_calls(session: Session, task_id: str, limit: int = MAX_TASK_CALLS) -> Sequence[LLMUsage]:
    """The task's LLM calls in the order they were made (the caller checked the task is
    visible)."""
    return session.scalars(
        select(LLMUsage)
        .where(LLMUsage.task_id == task_id)
        .order_by(LLMUsage.timestamp, LLMUsage.id)
        .limit(limit)
    ).all()


def _sum(column: Any, name: str) -> Any:
    # Typed: PostgreSQL's SUM(bigint) is numeric, which would come back as Decimal.
    return cast(func.sum(column), Float if name == "latency_ms_sum" else BigInteger)


def rollup_groups(
    conn: Connection,
    keys: Sequence[Dimension],
    since_day: date,
    until_day: date,
    *,
    user_id: str | None = None,
    user_ids: Sequence[str] | None = None,
    cost_only: bool = False,
) -> list[tuple[tuple[Any, ...], UsageSums]]:
    """Sums per combination of ``keys`` over days in ``[since_day, until_day)``, of one user's
    calls or (``user_id`` None) everyone's.

    The narrowest rollup that holds the keys answers (``app.usage.queries.rollup_table``):
    everyone's sums by model, agent, provider, operation and day from the overall rollup (a
    few rows a day); by user, or of one user, from the per-user rollup through its ``day``
    index or its ``(user_id, day, ...)`` key; by task, or one user's by agent, from
    ``usage_rollup_daily``. ``user_ids``: only these users' calls (ranges of the per-user
    rollup's ``(user_id, day, ...)`` key). With ``cost_only`` the sums hold the cost alone (in
    ``UsageSums.cost_pico_usd``; the rest are zero).
    """
    by_user = user_id is not None or user_ids is not None or "user" in keys
    c = rollup_table(by_task="task" in keys, by_user=by_user, by_agent="agent" in keys).c
    dims = [c[_COLUMNS[k]] for k in keys]
    names = ("cost_pico_usd",) if cost_only else SUM_FIELDS
    stmt = select(*dims, *(_sum(c[name], name) for name in names)).where(
        c.day >= since_day, c.day < until_day
    )
    if user_id is not None:
        stmt = stmt.where(c.user_id == user_id)
    if user_ids is not None:
        stmt = stmt.where(c.user_id.in_(list(user_ids)))
    if "task" in keys:
        stmt = stmt.where(c.task_id != "")
    stmt = stmt.group_by(*dims).having(func.sum(c.requests) != 0)
    width = len(keys)
    cost_at = SUM_FIELDS.index("cost_pico_usd")
    out: list[tuple[tuple[Any, ...], UsageSums]] = []
    for row in conn.execute(stmt):
        key = tuple(_day(v) if k == "day" else v for k, v in zip(keys, row[:width], strict=True))
        if cost_only:
            values: list[Any] = [0] * len(SUM_FIELDS)
            values[cost_at] = int(row[width] or 0)
            out.append((key, UsageSums(values)))
        else:
            out.append((key, UsageSums(row[width:])))
    return out


SpendCell = tuple[date, str, str, int, int]
"""(UTC day, user id, task id, picodollars, calls): what one user's calls for one task cost
on one day ('' task: calls of no task). Plain tuples: a 30-day overview adds up thousands."""


def spend_cells(
    conn: Connection, since_day: date, until_day: date, *, user_id: str | None = None
) -> list[SpendCell]:
    """Cost and calls per (day, user, task) in ``[since_day, until_day)``: one range scan of
    ``usage_rollup_daily`` (one user's, through ``(user_id, day)``) that answers a user's top
    tasks on the overview."""
    r = UsageRollupDaily
    stmt = (
        select(
            r.day,
            r.user_id,
            r.task_id,
            cast(func.sum(r.cost_pico_usd), BigInteger),
            cast(func.sum(r.requests), BigInteger),
        )
        .where(r.day >= since_day, r.day < until_day)
        .group_by(r.day, r.user_id, r.task_id)
        .having(func.sum(r.requests) != 0)
    )
    if user_id is not None:
        stmt = stmt.where(r.user_id == user_id)
    days: dict[Any, date] = {}
    cells: list[SpendCell] = []
    for d, u, t, c, n in conn.execute(stmt):
        day = days.get(d)
        if day is None:
            day = days[d] = _day(d)
        cells.append((day, u, t, c or 0, n or 0))
    return cells


def _day(value: Any) -> date:
    return date.fromisoformat(value) if isinstance(value, str) else value  # SQLite: text


TaskSpend = tuple[str, str, int, int]
"""(task id, its user, picodollars, calls) of one task over some days."""

_FIRST_CANDIDATES = 32  # tasks read in the first batch of the ranking; each next batch is 4x


def top_task_spend(conn: Connection, since_day: date, until_day: date, top: int) -> list[TaskSpend]:
    """Everyone's ``top`` most expensive tasks over days in ``[since_day, until_day)``, most
    expensive first (ties by task id), exactly as summing ``usage_rollup_daily`` would rank
    them, without reading a row per task of the window.

    ``usage_rollup_task_total`` is read in descending total cost: a task's cost over some days
    is at most its total (costs are never negative), so once ``top`` tasks cost more in the
    window than the next candidate's total, no task further down can enter. A candidate whose
    days all fall in the window costs its total there; one whose days straddle an end is summed
    from its ``usage_rollup_daily`` rows (the ``(task_id, day)`` index). A task's user is the
    greatest user id of its calls, as the overview has always named it.
    """
    t = UsageRollupTaskTotal
    ranked: list[TaskSpend] = []
    offset, batch = 0, _FIRST_CANDIDATES
    while True:
        candidates = conn.execute(
            select(t.task_id, t.user_id, t.first_day, t.last_day, t.requests, t.cost_pico_usd)
            .order_by(t.cost_pico_usd.desc())
            .offset(offset)
            .limit(batch)
        ).all()
        for task_id, user_id, first, last, requests, total in candidates:
            if len(ranked) >= top and ranked[top - 1][2] > total:
                return ranked[:top]
            first, last = _day(first), _day(last)
            if last < since_day or first >= until_day:
                continue  # no call in the window
            if first >= since_day and last < until_day:
                spend: TaskSpend | None = (task_id, user_id, total, requests) if requests else None
            else:
                spend = _task_spend(conn, task_id, since_day, until_day)
            if spend is not None:
                ranked.append(spend)
                ranked.sort(key=lambda item: (-item[2], item[0]))
                del ranked[top:]
        if len(candidates) < batch:
            return ranked[:top]
        offset += batch
        batch *= 4


def _task_spend(
    conn: Connection, task_id: str, since_day: date, until_day: date
) -> TaskSpend | None:
    """One task's cost and calls over days in ``[since_day, until_day)`` from its per-day rows
    (None when it made no call then), counted as ``spend_cells`` counts them."""
    r = UsageRollupDaily
    cells = (
        select(
            r.user_id,
            func.sum(r.cost_pico_usd).label("cost"),
            func.sum(r.requests).label("calls"),
        )
        .where(r.task_id == task_id, r.day >= since_day, r.day < until_day)
        .group_by(r.day, r.user_id)
        .having(func.sum(r.requests) != 0)
        .subquery()
    )
    user, cost, calls = conn.execute(
        select(
            func.max(cells.c.user_id),
            cast(func.sum(cells.c.cost), BigInteger),
            cast(func.sum(cells.c.calls), BigInteger),
        )
    ).one()
    return None if user is None else (task_id, user, cost or 0, calls or 0)


def user_spend(conn: Connection, since_day: date, until_day: date) -> dict[str, int]:
    """Everyone's cost per user over days in ``[since_day, until_day)``, in picodollars ('':
    calls of no user), from the per-user rollup: one row per user back, not one per user and
    day."""
    u = UsageRollupUserDaily
    stmt = (
        select(u.user_id, cast(func.sum(u.cost_pico_usd), BigInteger))
        .where(u.day >= since_day, u.day < until_day)
        .group_by(u.user_id)
        .having(func.sum(u.requests) != 0)
    )
    return {user: cost or 0 for user, cost in conn.execute(stmt)}


def users_daily_spend(
    conn: Connection, user_ids: Sequence[str], since_day: date, until_day: date
) -> dict[tuple[date, str], int]:
    """The cost per (UTC day, user) of ``user_ids`` over days in ``[since_day, until_day)``:
    ranges of the per-user rollup's ``(user_id, day, ...)`` key, a few rows per user and day."""
    if not user_ids:
        return {}
    u = UsageRollupUserDaily
    stmt = (
        select(u.day, u.user_id, cast(func.sum(u.cost_pico_usd), BigInteger))
        .where(u.user_id.in_(list(user_ids)), u.day >= since_day, u.day < until_day)
        .group_by(u.day, u.user_id)
        .having(func.sum(u.requests) != 0)
    )
    return {(_day(d), user): cost or 0 for d, user, cost in conn.execute(stmt)}
