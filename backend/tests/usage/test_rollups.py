"""The usage rollups: every report read from them equals a from-scratch aggregation of
``llm_usage``, on SQLite and PostgreSQL; the reports read nothing else; and
``apply_to_rollups`` moves every rollup by a signed delta, as a price recompute does."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.orm import Session

from app.core.money import pico_to_usd
from app.models import LLMUsage, UsageRollupDaily, UsageRollupDailyOverall, UsageRollupUserDaily
from app.tracking.record import UsageRecord
from app.tracking.writer import (
    ROLLUP_KEY_FIELDS,
    apply_to_rollups,
    rollup_values,
    utc_day,
)
from app.usage.report import Source, overall_usage, task_usage, usage_window, user_usage
from tests.usage.ledger import ADMIN, NOW, assert_same_report, random_ledger, write_ledger

USERS = ("alice", "bob")
TASKS = ("t1", "t2", "t3")
DAYS = (1, 7, 30, 365)


def every_report(session: Session, source: Source = "rollup") -> dict[str, Any]:
    """Every usage report the API serves, for every user, task and a range of windows."""
    reports: dict[str, Any] = {}
    for days in DAYS:
        window = usage_window(days, NOW)
        reports[f"overall/{days}"] = overall_usage(session, window, source=source)
        for user in USERS:
            reports[f"user/{user}/{days}"] = user_usage(session, ADMIN, user, window, source=source)
    for task in TASKS:
        reports[f"task/{task}"] = task_usage(session, ADMIN, task, source=source)
    return {name: report.model_dump() for name, report in reports.items()}


@pytest.fixture
def ledger(engine: Engine) -> list[UsageRecord]:
    return write_ledger(engine, random_ledger(300, seed=11))


@pytest.fixture
def session(engine: Engine, ledger: list[UsageRecord]) -> Iterator[Session]:
    with Session(engine) as s:
        yield s


def test_every_report_from_the_rollups_equals_the_raw_rows(session: Session) -> None:
    rollup, raw = every_report(session), every_report(session, "raw")

    assert_same_report(rollup, raw)
    assert {p["provider"] for p in rollup["overall/365"]["by_provider"]} == {
        "openai", "anthropic", "mistral",
    }  # fmt: skip
    assert {o["operation"] for o in rollup["user/alice/30"]["by_operation"]} == {
        "chat", "responses", "embeddings",
    }  # fmt: skip


def _by(records: list[UsageRecord], field: str) -> dict[str, tuple[int, Decimal]]:
    calls: dict[str, int] = defaultdict(int)
    cost: dict[str, int] = defaultdict(int)
    for record in records:
        key = getattr(record, field)
        calls[key] += 1
        cost[key] += record.cost_pico_usd
    return {key: (calls[key], pico_to_usd(cost[key])) for key in calls}


def test_breakdowns_by_provider_and_operation_are_the_records_summed_by_hand(
    session: Session, ledger: list[UsageRecord]
) -> None:
    window = usage_window(30, NOW)
    in_window = [r for r in ledger if window.since <= r.timestamp < window.until]
    scopes = {
        "overall": (overall_usage(session, window), in_window),
        "user": (
            user_usage(session, ADMIN, "alice", window),
            [r for r in in_window if r.user_id == "alice"],
        ),
        "task": (task_usage(session, ADMIN, "t2"), [r for r in ledger if r.task_id == "t2"]),
    }
    for name, (report, records) in scopes.items():
        for field in ("provider", "operation"):
            shown = {
                getattr(row, field): (row.requests, row.cost_usd)
                for row in getattr(report, f"by_{field}")
            }
            assert shown == _by(records, field), (name, field)
        costs = [row.cost_usd for row in report.by_provider]
        assert costs == sorted(costs, reverse=True), name


def test_reports_read_the_rollups_only(engine: Engine, session: Session) -> None:
    before = every_report(session)
    session.close()
    with engine.begin() as conn:  # as retention prunes them
        conn.execute(delete(LLMUsage))

    with Session(engine) as fresh:
        assert every_report(fresh) == before


def _rollup_totals(engine: Engine) -> dict[str, tuple[int, int]]:
    with engine.connect() as conn:
        return {
            table.__tablename__: tuple(  # type: ignore[misc]
                conn.execute(select(func.sum(table.requests), func.sum(table.cost_pico_usd))).one()
            )
            for table in (UsageRollupDaily, UsageRollupUserDaily, UsageRollupDailyOverall)
        }


def test_every_rollup_table_holds_every_call(engine: Engine, ledger: list[UsageRecord]) -> None:
    expected = (len(ledger), sum(r.cost_pico_usd for r in ledger))

    assert set(_rollup_totals(engine).values()) == {expected}


def test_subtracting_a_rows_values_takes_it_out_of_every_report(
    engine: Engine, ledger: list[UsageRecord]
) -> None:
    gone = [r for r in ledger if r.task_id == "t1" and r.user_id == "alice"][:3]
    with engine.begin() as conn:
        for record in gone:
            conn.execute(delete(LLMUsage).where(LLMUsage.request_id == record.request_id))
            apply_to_rollups(conn, rollup_values(record), sign=-1)

    with Session(engine) as session:
        assert_same_report(every_report(session), every_report(session, "raw"))


def test_a_cost_delta_moves_every_report_by_exactly_the_delta(
    engine: Engine, ledger: list[UsageRecord]
) -> None:
    """What a price recompute does: the row's new cost, and its rollups moved by the delta."""
    repriced = [r for r in ledger if r.cost_status == "unpriced" and r.status != "blocked"][:5]
    assert repriced
    with engine.begin() as conn:
        for n, record in enumerate(repriced):
            delta = 10**9 + n
            conn.execute(
                update(LLMUsage)
                .where(LLMUsage.request_id == record.request_id)
                .values(cost_pico_usd=record.cost_pico_usd + delta, cost_status="priced")
            )
            values = rollup_values(record)
            key = {name: values[name] for name in ROLLUP_KEY_FIELDS}
            apply_to_rollups(conn, {**key, "cost_pico_usd": delta, "unpriced_calls": -1})

    with Session(engine) as session:
        assert_same_report(every_report(session), every_report(session, "raw"))
    added = sum(10**9 + n for n in range(len(repriced)))
    totals = _rollup_totals(engine)
    assert set(totals.values()) == {(len(ledger), sum(r.cost_pico_usd for r in ledger) + added)}


def test_a_delta_without_its_key_is_refused(engine: Engine, ledger: list[UsageRecord]) -> None:
    values = rollup_values(ledger[0])
    del values["provider"]
    with engine.begin() as conn, pytest.raises(KeyError, match="provider"):
        apply_to_rollups(conn, values, sign=-1)


def test_the_rollup_day_of_a_call_is_its_utc_day() -> None:
    late_evening_in_new_york = datetime.fromisoformat("2026-05-19T23:30:00-04:00")

    assert utc_day(late_evening_in_new_york).isoformat() == "2026-05-20"
    assert utc_day(datetime(2026, 5, 19, 23, 30)).isoformat() == "2026-05-19"
