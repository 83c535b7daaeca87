"""The usage page: spend and calls grouped by user, model, agent, provider, operation (the OpenAI
API called) or UTC day over a range of days, and the same table as CSV.

A user's table covers their own calls only; an administrator's everyone's, or one user's. The
figures are the usage reports' (``UsageSums`` from the rollups, p95 by the report's
``histogram_quantile``), so a row matches what ``/api/v1/usage`` says for the same scope.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, get_args

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from app.access.principal import Principal
from app.core.errors import InvalidInput
from app.core.money import pico_to_usd
from app.usage.queries import UsageSums
from app.usage.report import MAX_DAYS, histogram_quantile
from app.web import queries
from app.web.cache import ClosedDaysCache

GroupBy = Literal["day", "model", "agent", "provider", "operation", "user"]
GROUP_BYS: tuple[GroupBy, ...] = get_args(GroupBy)
DEFAULT_DAYS = 30
MAX_ROWS_SHOWN = 100  # the rest of the groups are summed in one row (the CSV has them all)
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True, slots=True)
class UsageRow:
    key: str
    requests: int
    successes: int
    errors: int
    blocked: int
    unpriced_calls: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    total_tokens: int
    cost_usd: Decimal
    avg_latency_ms: float | None
    p95_latency_ms: float | None

    @classmethod
    def of(cls, key: str, sums: UsageSums) -> UsageRow:
        counts = sums.counts()
        return cls(
            key=key,
            requests=counts["requests"],
            successes=counts["successes"],
            errors=counts["errors"],
            blocked=counts["blocked"],
            unpriced_calls=counts["unpriced_calls"],
            prompt_tokens=counts["prompt_tokens"],
            completion_tokens=counts["completion_tokens"],
            cached_tokens=counts["cached_tokens"],
            reasoning_tokens=counts["reasoning_tokens"],
            total_tokens=counts["total_tokens"],
            cost_usd=pico_to_usd(sums.cost_pico_usd),
            avg_latency_ms=sums.latency_ms_sum / sums.requests if sums.requests else None,
            p95_latency_ms=histogram_quantile(0.95, sums.latency_buckets),
        )


@dataclass(frozen=True, slots=True)
class UsageQuery:
    group_by: GroupBy
    since: date  # first UTC day
    until: date  # last UTC day, included
    user_id: str | None  # whose calls; None: everyone's (administrators only)

    @property
    def export_since(self) -> datetime:
        return datetime.combine(self.since, datetime.min.time(), UTC)

    @property
    def export_until(self) -> datetime:
        return datetime.combine(self.until + timedelta(days=1), datetime.min.time(), UTC)


@dataclass(frozen=True, slots=True)
class UsageTable:
    query: UsageQuery
    rows: list[UsageRow]
    total: UsageRow
    rest: UsageRow | None = None  # the groups past the limit, summed in one row


def parse_query(
    principal: Principal,
    group_by: str | None,
    since: str | None,
    until: str | None,
    user_id: str | None,
    today: date,
) -> UsageQuery:
    """The page's query from its parameters (``InvalidInput`` for a bad one); a user's is
    always about their own calls."""
    group = group_by or "day"
    if group not in GROUP_BYS:
        raise InvalidInput(f"group_by must be one of {', '.join(GROUP_BYS)}.", field="group_by")
    last = _date("until", until) or today
    first = _date("since", since) or last - timedelta(days=DEFAULT_DAYS - 1)
    if first > last:
        raise InvalidInput("since must not be after until.", field="since")
    if (last - first).days >= MAX_DAYS:
        raise InvalidInput(f"The range may cover at most {MAX_DAYS} days.", field="since")
    who = user_id or None
    if not principal.is_admin:
        principal.ensure_can_read_user(who or principal.user_id)
        who = principal.user_id
    return UsageQuery(group_by=group, since=first, until=last, user_id=who)


def _date(name: str, value: str | None) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise InvalidInput(f"{name} must be a date (YYYY-MM-DD).", field=name) from exc


def usage_table(
    session: Session,
    query: UsageQuery,
    *,
    limit: int | None = MAX_ROWS_SHOWN,
    closed_days: ClosedDaysCache | None = None,
    today: date | None = None,
) -> UsageTable:
    """The groups, most expensive first (days in order); past ``limit`` rows, the rest are
    summed in ``rest``. Everyone's usage by user (a row per task and day to add up) takes the
    days before ``today`` from ``closed_days`` when given."""
    conn = session.connection()
    since, until = query.since, query.until + timedelta(days=1)
    keys = (query.group_by,)
    today = today or datetime.now(UTC).date()
    if query.user_id is None and query.group_by == "user" and limit is not None:
        return _everyone_by_user(conn, query, limit, closed_days, today)
    if closed_days is not None and query.user_id is None and query.group_by == "user":
        ended_until = min(until, today)
        parts: dict[tuple[Any, ...], list[UsageSums]] = {}
        if since < ended_until:
            ended = closed_days.get(
                ("usage", keys, since, ended_until),
                lambda: queries.rollup_groups(conn, keys, since, ended_until),
            )
            for key, sums in ended:
                parts.setdefault(key, []).append(sums)
        if until > today:
            for key, sums in queries.rollup_groups(conn, keys, max(since, today), until):
                parts.setdefault(key, []).append(sums)
        groups = [(key, UsageSums.total(sums)) for key, sums in parts.items()]
    else:
        groups = queries.rollup_groups(conn, keys, since, until, user_id=query.user_id)
    labelled = [(_label(query.group_by, key[0]), sums) for key, sums in groups]
    if query.group_by == "day":
        labelled.sort(key=lambda item: item[0])
    else:
        labelled.sort(key=lambda item: (-item[1].cost_pico_usd, item[0]))
    total = UsageRow.of("Total", UsageSums.total(s for _, s in groups))
    rest = None
    if limit is not None and len(labelled) > limit:
        hidden = labelled[limit:]
        labelled = labelled[:limit]
        rest = UsageRow.of(
            f"{len(hidden):,} more (in the CSV)", UsageSums.total(s for _, s in hidden)
        )
    rows = [UsageRow.of(label, sums) for label, sums in labelled]
    return UsageTable(query=query, rows=rows, total=total, rest=rest)


UserSums = dict[str, UsageSums]


def _everyone_by_user(
    conn: Connection,
    query: UsageQuery,
    limit: int,
    closed_days: ClosedDaysCache | None,
    today: date,
) -> UsageTable:
    """Everyone's usage by user as the page shows it, without summing every figure of every
    user: the users ranked by their cost alone (``queries.user_spend``), every figure of the
    ``limit`` most expensive read for them alone (ranges of the per-user rollup's key), the
    total from the overall rollup and the rest as the total less the shown. Summing all 27
    figures of every user sorts a wide row per user, day and model (~14,500 for 30 days at 1M
    calls; the CSV still does).

    With ``closed_days``, the days before ``today`` are kept: every user's cost and the figures
    of the users who ranked first on those days; today's are read, and the ended days of a user
    whom today's calls lift into the shown ones."""
    since, until = query.since, query.until + timedelta(days=1)
    ended_until = max(since, min(until, today)) if closed_days is not None else since

    def rank(cost: dict[str, int]) -> list[str]:
        return sorted(cost, key=lambda u: (-cost[u], _label("user", u)))

    def ended_part() -> tuple[dict[str, int], UserSums]:
        cost = queries.user_spend(conn, since, ended_until)
        return cost, _user_sums(conn, rank(cost)[:limit], since, ended_until)

    ended_cost: dict[str, int] = {}
    ended_sums: UserSums = {}
    if closed_days is not None and since < ended_until:
        ended_cost, ended_sums = closed_days.get(("usage-by-user", since, ended_until), ended_part)
    live_cost = queries.user_spend(conn, ended_until, until) if until > ended_until else {}
    cost = dict(ended_cost)  # a kept part is shared: never changed
    for user, pico in live_cost.items():
        cost[user] = cost.get(user, 0) + pico
    ranked = rank(cost)
    shown = ranked[:limit]
    missing = [u for u in shown if u in ended_cost and u not in ended_sums]
    parts = [
        ended_sums,
        _user_sums(conn, missing, since, ended_until),
        _user_sums(conn, [u for u in shown if u in live_cost], ended_until, until),
    ]
    sums = {u: UsageSums.total(p[u] for p in parts if u in p) for u in shown}
    everyone = queries.rollup_groups(conn, (), since, until)
    total = UsageSums.total(s for _, s in everyone) if everyone else UsageSums()
    rows = [UsageRow.of(_label("user", u), sums[u]) for u in shown]
    rest = None
    if len(ranked) > limit:
        left = [t - sum(s.values[i] for s in sums.values()) for i, t in enumerate(total.values)]
        rest = UsageRow.of(f"{len(ranked) - limit:,} more (in the CSV)", UsageSums(left))
    return UsageTable(query=query, rows=rows, total=UsageRow.of("Total", total), rest=rest)


def _user_sums(conn: Connection, users: list[str], since: date, until: date) -> UserSums:
    if not users or since >= until:
        return {}
    groups = queries.rollup_groups(conn, ("user",), since, until, user_ids=users)
    return {key[0]: sums for key, sums in groups}


def _label(group_by: GroupBy, value: object) -> str:
    if isinstance(value, date):
        return value.isoformat()
    if not value:
        return "(none)"
    return str(value)


CSV_COLUMNS = (
    "requests", "successes", "errors", "blocked", "unpriced_calls", "prompt_tokens",
    "completion_tokens", "cached_tokens", "reasoning_tokens", "total_tokens", "cost_usd",
    "avg_latency_ms", "p95_latency_ms",
)  # fmt: skip


def table_csv(table: UsageTable) -> Iterator[str]:
    """The table as CSV (the total last); a cell a spreadsheet would run as a formula is
    prefixed with ``'``, as the usage export does."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow([table.query.group_by, *CSV_COLUMNS])
    for row in [*table.rows, table.total]:
        key = "'" + row.key if row.key.startswith(_FORMULA_PREFIXES) else row.key
        values = [getattr(row, name) for name in CSV_COLUMNS]
        writer.writerow(
            [key, *(format(v, "f") if isinstance(v, Decimal) else "" if v is None else v
                    for v in values)]
        )  # fmt: skip
    yield buffer.getvalue()
