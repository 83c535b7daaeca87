"""``usage_rollup_task_total`` (the overview's top tasks) on SQLite and PostgreSQL: after
writes, a spool replay, a price recompute and retention it equals the calls summed from
scratch, revision 0015 fills it from what the daily rollup holds (calls retention pruned
included), and the top tasks read through it rank as summing every call would."""

from __future__ import annotations

import dataclasses
import random
import uuid
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Engine, delete, select, text

from app.core.migrations import alembic_config, upgrade_to_head
from app.models import LLMUsage, UsageRollupTaskTotal
from app.prices.recompute import recompute_prices
from app.tracking.pricing import PriceBook
from app.tracking.record import UsageRecord
from app.tracking.spool import UsageSpool
from app.tracking.writer import UsageWriter, insert_usage, utc_day
from app.usage.retention import prune_raw_usage
from app.web.queries import top_task_spend
from tests.usage.ledger import NOW, random_ledger, write_ledger
from tests.usage.test_recompute import LLAMA, scope, tracked

Totals = dict[str, tuple[str, date, date, int, int]]


def spread_ledger(count: int, seed: int) -> list[UsageRecord]:
    """Calls of many tasks over 40 days (a task's calls on one to three days, now and then by
    a second user) and calls of no task."""
    rng = random.Random(seed)
    records = []
    for record in random_ledger(count, seed):
        task = rng.choice([f"t{n:02d}" for n in range(40)] + [None] * 8)
        days_ago = int(task[1:]) % 38 + rng.randint(0, 2) if task else rng.randint(0, 40)
        user = rng.choice(["alice", "bob", None]) if rng.random() < 0.1 else f"u-{task}"
        records.append(
            dataclasses.replace(
                record,
                task_id=task,
                user_id=user,
                timestamp=NOW - timedelta(days=days_ago, seconds=rng.randint(0, 3600)),
            )
        )
    return records


def by_hand(rows: list[Any]) -> Totals:
    """Per task: the greatest user, first and last UTC day, calls and cost of ``rows``."""
    totals: Totals = {}
    for r in rows:
        if not r.task_id:
            continue
        day = utc_day(r.timestamp)
        user, first, last, calls, cost = totals.get(r.task_id, ("", day, day, 0, 0))
        totals[r.task_id] = (
            max(user, r.user_id or ""), min(first, day), max(last, day), calls + 1,
            cost + r.cost_pico_usd,
        )  # fmt: skip
    return totals


def stored(engine: Engine) -> Totals:
    t = UsageRollupTaskTotal
    with engine.connect() as conn:
        found = conn.execute(
            select(t.task_id, t.user_id, t.first_day, t.last_day, t.requests, t.cost_pico_usd)
        )
        return {row[0]: tuple(row[1:]) for row in found}  # type: ignore[misc]


def ledger_rows(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(LLMUsage.__table__)))


def from_daily_rollup(engine: Engine) -> Totals:
    """Per task, what ``usage_rollup_daily`` holds (it keeps the calls retention pruned)."""
    with engine.connect() as conn:
        found = conn.execute(
            text(
                "SELECT task_id, MAX(user_id), MIN(day), MAX(day), SUM(requests), "
                "SUM(cost_pico_usd) FROM usage_rollup_daily WHERE task_id <> '' GROUP BY task_id"
            )
        )
        return {
            row[0]: (row[1], _day(row[2]), _day(row[3]), int(row[4]), int(row[5])) for row in found
        }


def _day(value: Any) -> date:
    return date.fromisoformat(value) if isinstance(value, str) else value


@pytest.fixture
def ledger(engine: Engine) -> list[UsageRecord]:
    return write_ledger(engine, spread_ledger(400, seed=3))


def test_written_calls_are_summed_per_task(engine: Engine, ledger: list[UsageRecord]) -> None:
    totals = stored(engine)

    assert totals == by_hand(ledger)
    assert any(first != last for _, first, last, _, _ in totals.values())  # multi-day tasks
    assert any(r.task_id is None for r in ledger)  # and calls of no task, not counted


def test_a_replayed_spool_counts_each_call_once(engine: Engine, tmp_path: Path) -> None:
    records = spread_ledger(120, seed=8)
    writer = UsageWriter(engine, UsageSpool(tmp_path))
    for record in records[:40]:
        writer.write(record)
    for record in records:  # the first 40 again: already in, counted once
        writer.spool_row(record)

    assert writer.replay_spool() == len(records)

    assert stored(engine) == by_hand(records)


def test_a_price_recompute_moves_the_totals_with_the_rows(engine: Engine) -> None:
    rng, book = random.Random(2), PriceBook()
    write_ledger(engine, [tracked(book, rng, tasks=("t1", "t2", "t3", None)) for _ in range(200)])
    before = stored(engine)

    recompute_prices(engine, PriceBook({"my-llama": LLAMA}), scope(), actor="ops", batch_rows=29)

    after = stored(engine)
    assert after == by_hand(ledger_rows(engine))
    assert sum(a[4] for a in after.values()) > sum(b[4] for b in before.values())


def test_retention_keeps_the_totals(engine: Engine, ledger: list[UsageRecord]) -> None:
    before = stored(engine)

    assert prune_raw_usage(engine, 10, now=NOW).deleted > 0

    assert stored(engine) == before == by_hand(ledger)
    assert stored(engine) != by_hand(ledger_rows(engine))  # the rows are gone, not the sums


def test_top_tasks_rank_as_summing_every_call_would(
    engine: Engine, ledger: list[UsageRecord]
) -> None:
    today = NOW.date()
    for since, until, top in [
        (today - timedelta(days=29), today + timedelta(days=1), 5),
        (today - timedelta(days=6), today + timedelta(days=1), 3),
        (today - timedelta(days=20), today - timedelta(days=10), 5),  # days that ended
        (today - timedelta(days=400), today + timedelta(days=1), 50),  # more than there are
    ]:
        window = [r for r in ledger if r.task_id and since <= utc_day(r.timestamp) < until]
        cost: dict[str, int] = {}
        for r in window:
            cost[r.task_id] = cost.get(r.task_id, 0) + r.cost_pico_usd  # type: ignore[index]
        owners, calls = by_hand(window), {t: v[3] for t, v in by_hand(window).items()}
        expected = [
            (t, owners[t][0], cost[t], calls[t])
            for t in sorted(cost, key=lambda t: (-cost[t], t))[:top]
        ]
        with engine.connect() as conn:
            assert top_task_spend(conn, since, until, top) == expected, (since, until)


# Revision 0015: the table filled from what the daily rollup holds.


@pytest.fixture
def migrated_ledger(engine: Engine, database_url: str) -> Iterator[list[UsageRecord]]:
    records = write_ledger(engine, spread_ledger(300, seed=5))
    yield records
    upgrade_to_head(database_url)  # for the next test, even if this one failed half-way


def _downgrade_below_0015(database_url: str) -> None:
    command.downgrade(alembic_config(database_url), "0014")


def test_the_revision_fills_the_totals_as_the_writer_wrote_them(
    engine: Engine, database_url: str, migrated_ledger: list[UsageRecord]
) -> None:
    written = stored(engine)
    _downgrade_below_0015(database_url)
    with engine.connect() as conn:
        tables = set(conn.dialect.get_table_names(conn))
    assert "usage_rollup_task_total" not in tables

    upgrade_to_head(database_url)

    assert stored(engine) == written == by_hand(migrated_ledger)


def test_calls_pruned_before_the_revision_stay_counted(
    engine: Engine, database_url: str, migrated_ledger: list[UsageRecord]
) -> None:
    _downgrade_below_0015(database_url)
    with engine.begin() as conn:  # retention ran before the upgrade: rows go, rollups stay
        conn.execute(delete(LLMUsage).where(LLMUsage.timestamp < NOW - timedelta(days=15)))

    upgrade_to_head(database_url)

    assert stored(engine) == by_hand(migrated_ledger) == from_daily_rollup(engine)
    late = dataclasses.replace(migrated_ledger[0], id=uuid.uuid4().hex, request_id=uuid.uuid4().hex)
    with engine.begin() as conn:  # and the writer goes on from there
        insert_usage(conn, late)
    assert stored(engine) == by_hand([*migrated_ledger, late])
