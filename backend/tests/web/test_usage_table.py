"""The usage page's table for every grouping (provider and operation included), everyone's and
one user's, equals the calls summed by hand; everyone's by user is the same with the ended days
kept or not."""

from __future__ import annotations

import dataclasses
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app.access.principal import Principal
from app.core.money import pico_to_usd
from app.tracking.record import UsageRecord
from app.tracking.writer import insert_usage, utc_day
from app.web.cache import ClosedDaysCache
from app.web.usage import GROUP_BYS, UsageQuery, parse_query, usage_table
from tests.usage.ledger import ADMIN, NOW, assert_same_report, random_ledger, write_ledger

TODAY = NOW.date()
SINCE = TODAY - timedelta(days=29)


@pytest.fixture
def ledger(engine: Engine) -> list[UsageRecord]:
    return write_ledger(engine, random_ledger(300, seed=3))


@pytest.fixture
def session(engine: Engine, ledger: list[UsageRecord]) -> Iterator[Session]:
    with Session(engine) as s:
        yield s


def _label(record: UsageRecord, group_by: str) -> str:
    if group_by == "day":
        return utc_day(record.timestamp).isoformat()
    value = record.user_id if group_by == "user" else getattr(record, group_by)
    return value or "(none)"


def by_hand(records: list[UsageRecord], group_by: str) -> dict[str, tuple[int, Decimal]]:
    calls: dict[str, int] = defaultdict(int)
    cost: dict[str, int] = defaultdict(int)
    for record in records:
        if SINCE <= utc_day(record.timestamp) <= TODAY:
            calls[_label(record, group_by)] += 1
            cost[_label(record, group_by)] += record.cost_pico_usd
    return {k: (calls[k], pico_to_usd(cost[k])) for k in calls}


@pytest.mark.parametrize("group_by", GROUP_BYS)
def test_everyones_table_is_the_calls_summed_by_hand(
    session: Session, ledger: list[UsageRecord], group_by: str
) -> None:
    query = parse_query(ADMIN, group_by, None, None, None, TODAY)

    table = usage_table(session, query, limit=None, today=TODAY)

    assert {r.key: (r.requests, r.cost_usd) for r in table.rows} == by_hand(ledger, group_by)
    assert table.total.requests == sum(n for n, _ in by_hand(ledger, group_by).values())


@pytest.mark.parametrize("group_by", GROUP_BYS)
def test_a_users_table_is_their_calls_summed_by_hand(
    session: Session, ledger: list[UsageRecord], group_by: str
) -> None:
    query = parse_query(Principal("bob", "user"), group_by, None, None, None, TODAY)

    table = usage_table(session, query, limit=None, today=TODAY)

    mine = [r for r in ledger if r.user_id == "bob"]
    assert {r.key: (r.requests, r.cost_usd) for r in table.rows} == by_hand(mine, group_by)


def test_everyones_table_by_user_is_the_same_with_ended_days_kept(session: Session) -> None:
    query = UsageQuery(group_by="user", since=SINCE, until=TODAY, user_id=None)
    cache = ClosedDaysCache()

    fresh = usage_table(session, query, limit=None, today=TODAY)
    first = usage_table(session, query, limit=None, today=TODAY, closed_days=cache)
    kept = usage_table(session, query, limit=None, today=TODAY, closed_days=cache)

    for other in (first, kept):  # latency sums may add up in another order: floats to 1e-9
        assert_same_report(
            [dataclasses.asdict(r) for r in [*other.rows, other.total]],
            [dataclasses.asdict(r) for r in [*fresh.rows, fresh.total]],
        )


@pytest.mark.parametrize("kept", [False, True], ids=["nothing-kept", "ended-days-kept"])
@pytest.mark.parametrize("limit", [1, 2, 100])
@pytest.mark.parametrize("days", [(29, 0), (20, 5)], ids=["to-today", "ended-days"])
def test_everyones_page_by_user_shows_the_full_tables_top_rows_and_sums_the_rest(
    session: Session, limit: int, kept: bool, days: tuple[int, int]
) -> None:
    """The page ranks users by cost and reads every figure of the shown ones only: its rows,
    total and rest are the full table's (the CSV's)."""
    since, until = TODAY - timedelta(days=days[0]), TODAY - timedelta(days=days[1])
    query = UsageQuery(group_by="user", since=since, until=until, user_id=None)
    cache = ClosedDaysCache() if kept else None
    full = usage_table(session, query, limit=None, today=TODAY)
    assert len(full.rows) == 3  # alice, bob and calls of no user

    for _ in range(2):
        page = usage_table(session, query, limit=limit, today=TODAY, closed_days=cache)

        shown, hidden = full.rows[:limit], full.rows[limit:]
        assert_same_report(
            [dataclasses.asdict(r) for r in [*page.rows, page.total]],
            [dataclasses.asdict(r) for r in [*shown, full.total]],
        )
        if not hidden:
            assert page.rest is None
            continue
        assert page.rest is not None
        assert page.rest.key == f"{len(hidden)} more (in the CSV)"
        for name in ("requests", "errors", "unpriced_calls", "total_tokens", "cost_usd"):
            assert getattr(page.rest, name) == sum(getattr(r, name) for r in hidden), name


def test_a_user_lifted_into_the_shown_ones_by_todays_calls_has_every_ended_day_counted(
    engine: Engine, session: Session, ledger: list[UsageRecord]
) -> None:
    """The ended days are kept with the figures of the users who ranked first on them; a user
    whom today's calls lift above them is read for those days too."""
    query = UsageQuery(group_by="user", since=SINCE, until=TODAY, user_id=None)
    cache = ClosedDaysCache()
    first = usage_table(session, query, limit=1, today=TODAY, closed_days=cache)
    last = usage_table(session, query, limit=None, today=TODAY).rows[-1].key
    assert first.rows[0].key != last
    lifted = next(r for r in ledger if (r.user_id or "(none)") == last)
    with engine.begin() as conn:
        insert_usage(
            conn,
            dataclasses.replace(
                lifted,
                id=uuid.uuid4().hex,
                request_id=uuid.uuid4().hex,
                cost_pico_usd=10**15,
                timestamp=NOW.replace(hour=0, minute=1),
            ),
        )
    session.rollback()  # a new transaction: see the row

    page = usage_table(session, query, limit=1, today=TODAY, closed_days=cache)

    full = usage_table(session, query, limit=None, today=TODAY)
    assert page.rows[0].key == last == full.rows[0].key
    assert_same_report(dataclasses.asdict(page.rows[0]), dataclasses.asdict(full.rows[0]))
    assert page.rest is not None
    assert page.rest.requests == sum(r.requests for r in full.rows[1:])
