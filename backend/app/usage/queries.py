"""Reads of the usage ledger. All SQL over ``llm_usage`` and its rollups lives here.

The reports read the rollups only: ``usage_rollup_daily`` (one row per day, user, task, model,
agent, provider and operation) for a task, ``usage_rollup_user_daily`` (per user, day, model,
provider and operation) for a user, ``usage_rollup_daily_overall`` (per day, model, agent,
provider and operation) for everyone, so their cost grows with the number of keys in the
window, not of calls. The ``raw_*`` variants compute the same figures from ``llm_usage`` itself;
they exist to check the rollups against their source (tests, ``bench/usage_endpoints.py``) and
only see rows that retention has not pruned yet.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Date,
    Float,
    String,
    and_,
    bindparam,
    case,
    cast,
    func,
    literal,
    select,
)

from app.core.money import pico_to_usd
from app.models import (
    LATENCY_BUCKETS_MS,
    LLMUsage,
    UsageRollupDaily,
    UsageRollupDailyOverall,
    UsageRollupUserDaily,
)

BUCKET_COUNT = len(LATENCY_BUCKETS_MS) + 1  # the finite buckets and the overflow


@dataclass(frozen=True, slots=True)
class SpendTotals:
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: Decimal


def task_spend(conn: Connection, task_id: str) -> SpendTotals:
    """Everything a task's calls have cost (all time; from the rollup, so pruning keeps it)."""
    r = UsageRollupDaily
    stmt = select(
        func.coalesce(func.sum(r.requests), 0),
        func.coalesce(func.sum(r.prompt_tokens), 0),
        func.coalesce(func.sum(r.completion_tokens), 0),
        func.coalesce(func.sum(r.total_tokens), 0),
        func.coalesce(func.sum(r.cost_pico_usd), 0),
    ).where(r.task_id == task_id)
    return _spend_totals(conn.execute(stmt).one())


def user_spend(conn: Connection, user_id: str, days: int = 30) -> SpendTotals:
    """A user's spend over the last ``days`` x 24 hours (raw rows: a rolling, not daily, window)."""
    since = datetime.now(UTC) - timedelta(days=days)
    stmt = select(
        func.count(LLMUsage.id),
        func.coalesce(func.sum(LLMUsage.prompt_tokens), 0),
        func.coalesce(func.sum(LLMUsage.completion_tokens), 0),
        func.coalesce(func.sum(LLMUsage.total_tokens), 0),
        func.coalesce(func.sum(LLMUsage.cost_pico_usd), 0),
    ).where(LLMUsage.user_id == user_id, LLMUsage.timestamp >= since)
    return _spend_totals(conn.execute(stmt).one())


def _spend_totals(row: Sequence[Any]) -> SpendTotals:
    return SpendTotals(
        requests=int(row[0]),
        prompt_tokens=int(row[1]),
        completion_tokens=int(row[2]),
        total_tokens=int(row[3]),
        cost_usd=pico_to_usd(int(row[4])),
    )


# -- usage reports -------------------------------------------------------------------------

COUNT_FIELDS: tuple[str, ...] = (
    "requests", "successes", "errors", "blocked", "unpriced_calls", "prompt_tokens",
    "completion_tokens", "cached_tokens", "reasoning_tokens", "total_tokens", "cost_pico_usd",
)  # fmt: skip


SUM_FIELDS: tuple[str, ...] = (
    *COUNT_FIELDS,
    "latency_ms_sum",
    *(f"lat_b{i:02d}" for i in range(BUCKET_COUNT)),
)
_LATENCY_SUM_AT = len(COUNT_FIELDS)


class UsageSums:
    """Additive figures of a set of calls, as one flat list in ``SUM_FIELDS`` order: counts,
    tokens, picodollars, the latency sum and the latency histogram. Kept flat because a report
    adds up hundreds of groups and one list comprehension per group is the cheap way."""

    __slots__ = ("values",)

    def __init__(self, values: Sequence[Any] | None = None) -> None:
        self.values: list[Any] = list(values) if values is not None else [0] * len(SUM_FIELDS)

    @classmethod
    def total(cls, parts: Iterable[UsageSums]) -> UsageSums:
        """The sums of ``parts``, column by column (one pass per column, not one per part)."""
        columns = zip(*(part.values for part in parts), strict=True)
        summed = [sum(column) for column in columns]
        return cls(summed) if summed else cls()

    def counts(self) -> dict[str, int]:
        """The ``COUNT_FIELDS`` by name."""
        return dict(zip(COUNT_FIELDS, self.values, strict=False))

    @property
    def requests(self) -> int:
        return int(self.values[0])

    @property
    def cost_pico_usd(self) -> int:
        return int(self.values[COUNT_FIELDS.index("cost_pico_usd")])

    @property
    def latency_ms_sum(self) -> float:
        return float(self.values[_LATENCY_SUM_AT])

    @property
    def latency_buckets(self) -> list[int]:
        return self.values[_LATENCY_SUM_AT + 1 :]


@dataclass(frozen=True, slots=True)
class UsageGroup:
    """The sums of one (UTC day, model, agent, provider, operation) cell; ``agent`` is '' when
    calls had none or the report does not break down by agent; ``provider`` and ``operation``
    are '' for calls the rollups hold without them (pruned before revision 0008)."""

    day: date
    model: str
    agent: str
    provider: str
    operation: str
    sums: UsageSums


def _groups(rows: Sequence[Sequence[Any]]) -> list[UsageGroup]:
    groups = []
    for row in rows:
        day, model, agent, provider, operation, *values = row
        if isinstance(day, str):  # SQLite's date() returns text
            day = date.fromisoformat(day)
        groups.append(UsageGroup(day, model, agent, provider, operation, UsageSums(values)))
    return groups


def _summed(column: Any, name: str) -> ColumnElement[Any]:
    # Typed sums: PostgreSQL's SUM(bigint) is numeric, which would arrive as Decimal.
    return cast(func.sum(column), Float if name == "latency_ms_sum" else BigInteger)


def rollup_table(*, by_task: bool, by_user: bool, by_agent: bool) -> Any:
    """The narrowest rollup that answers a question: a task's from the per-task rollup, a
    user's from the per-user one (which has no agent), everyone's from the overall one."""
    if by_task or (by_user and by_agent):
        return UsageRollupDaily.__table__
    if by_user:
        return UsageRollupUserDaily.__table__
    return UsageRollupDailyOverall.__table__


@functools.cache
def _rollup_statement(
    *, by_task: bool, by_user: bool, since: bool, until: bool, by_agent: bool
) -> Any:
    """The rollup query for one combination of filters, built once (then the compiled cache
    serves it); the filter values are bound parameters."""
    c = rollup_table(by_task=by_task, by_user=by_user, by_agent=by_agent).c
    conditions: list[ColumnElement[bool]] = []
    if by_task:
        conditions.append(c.task_id == bindparam("task_id", type_=String))
    if by_user:
        conditions.append(c.user_id == bindparam("user_id", type_=String))
    if since:
        conditions.append(c.day >= bindparam("since_day", type_=Date))
    if until:
        conditions.append(c.day < bindparam("until_day", type_=Date))
    agent = c.agent if by_agent else literal("")
    keys = [c.day, c.model, c.provider, c.operation, *([agent] if by_agent else [])]
    return (
        select(c.day, c.model, agent, c.provider, c.operation,
               *(_summed(c[name], name) for name in SUM_FIELDS))
        .where(and_(True, *conditions))
        .group_by(*keys)
        .having(func.sum(c.requests) != 0)  # a key whose calls were all taken out again
    )  # fmt: skip


def rollup_usage_groups(
    conn: Connection,
    *,
    task_id: str | None = None,
    user_id: str | None = None,
    since_day: date | None = None,
    until_day: date | None = None,
    by_agent: bool = True,
) -> list[UsageGroup]:
    """Sums per (day, model, agent, provider, operation) from the rollups, for days in
    ``[since_day, until_day)``; with ``agent=''`` when not ``by_agent``.

    The table is :func:`rollup_table`'s: ``usage_rollup_daily`` through its (task_id, day)
    index for a task, ``usage_rollup_user_daily`` through its (user_id, day, ...) key for a
    user, ``usage_rollup_daily_overall`` (a few rows a day) for everyone.
    """
    stmt = _rollup_statement(
        by_task=task_id is not None,
        by_user=user_id is not None,
        since=since_day is not None,
        until=until_day is not None,
        by_agent=by_agent,
    )
    params = {"task_id": task_id, "user_id": user_id, "since_day": since_day,
              "until_day": until_day}  # fmt: skip
    return _groups(conn.execute(stmt, {k: v for k, v in params.items() if v is not None}).all())


def _utc_day(conn: Connection, column: Any) -> ColumnElement[Any]:
    if conn.dialect.name == "postgresql":
        # timestamptz::date would use the session's time zone; the rollup's days are UTC.
        return cast(func.timezone("UTC", column), Date)
    return func.date(column)  # SQLite stores UTC text; date() takes its day


def _latency_bucket(column: Any) -> ColumnElement[int]:
    """The rollup's bucket index of a latency: the first bucket whose upper bound is >= it."""
    whens = [(column <= bound, literal(i)) for i, bound in enumerate(LATENCY_BUCKETS_MS)]
    return case(*whens, else_=literal(len(LATENCY_BUCKETS_MS)))


def raw_usage_groups(
    conn: Connection,
    *,
    task_id: str | None = None,
    user_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    by_agent: bool = True,
) -> list[UsageGroup]:
    """The same sums as :func:`rollup_usage_groups`, computed from ``llm_usage`` rows."""
    u = LLMUsage
    day = _utc_day(conn, u.timestamp)
    bucket = _latency_bucket(u.latency_ms)

    def count_if(condition: ColumnElement[bool]) -> ColumnElement[Any]:
        return _summed(case((condition, 1), else_=0), "count")

    columns = [
        cast(func.count(), BigInteger),
        count_if(u.status == "success"),
        count_if(u.status == "error"),
        count_if(u.status == "blocked"),
        count_if(and_(u.cost_status == "unpriced", u.status != "blocked")),
        _summed(u.prompt_tokens, "prompt_tokens"),
        _summed(u.completion_tokens, "completion_tokens"),
        _summed(u.cached_tokens, "cached_tokens"),
        _summed(u.reasoning_tokens, "reasoning_tokens"),
        _summed(u.total_tokens, "total_tokens"),
        _summed(u.cost_pico_usd, "cost_pico_usd"),
        _summed(u.latency_ms, "latency_ms_sum"),
        *(count_if(bucket == i) for i in range(BUCKET_COUNT)),
    ]
    agent = func.coalesce(u.agent, "") if by_agent else literal("")
    keys = [day, u.model, u.provider, u.operation, *([agent] if by_agent else [])]
    stmt = (
        select(day, u.model, agent, u.provider, u.operation, *columns)
        .where(and_(True, *_usage_row_filter(task_id, user_id, since, until)))
        .group_by(*keys)
    )
    return _groups(conn.execute(stmt).all())


def task_user_ids(conn: Connection, task_id: str) -> list[str] | None:
    """The users a task's calls were made for ('' when unset); None if it has no usage at all."""
    r = UsageRollupDaily
    stmt = (
        select(r.user_id)
        .where(r.task_id == task_id)
        .group_by(r.user_id)
        .having(func.sum(r.requests) != 0)
    )
    rows = conn.execute(stmt).scalars().all()
    return sorted(rows) if rows else None


# -- export --------------------------------------------------------------------------------

EXPORT_COLUMNS: tuple[str, ...] = tuple(c.name for c in LLMUsage.__table__.columns)


def _usage_row_filter(
    task_id: str | None, user_id: str | None, since: datetime | None, until: datetime | None
) -> list[ColumnElement[bool]]:
    u = LLMUsage
    conditions: list[ColumnElement[bool]] = []
    if task_id is not None:
        conditions.append(u.task_id == task_id)
    if user_id is not None:
        conditions.append(u.user_id == user_id)
    if since is not None:
        conditions.append(u.timestamp >= since.astimezone(UTC))
    if until is not None:
        conditions.append(u.timestamp < until.astimezone(UTC))
    return conditions


def iter_usage_rows(
    conn: Connection,
    *,
    task_id: str | None = None,
    user_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    batch_size: int = 1000,
) -> Iterator[dict[str, Any]]:
    """Usage rows in time order, fetched ``batch_size`` at a time (a server-side cursor on
    PostgreSQL), so an export never holds more than one batch in memory."""
    table = LLMUsage.__table__
    stmt = (
        select(*(table.c[name] for name in EXPORT_COLUMNS))
        .where(and_(True, *_usage_row_filter(task_id, user_id, since, until)))
        .order_by(table.c.timestamp, table.c.id)
    )
    result = conn.execution_options(yield_per=batch_size).execute(stmt)
    for row in result.mappings():
        yield dict(row)
