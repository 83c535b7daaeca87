"""Usage reports from the rollup agree with the same reports computed from the raw rows."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app.tracking.writer import insert_usage
from app.usage import queries as usage_queries
from app.usage.report import (
    histogram_quantile,
    overall_usage,
    task_usage,
    usage_window,
    user_usage,
)
from tests.usage.ledger import ADMIN, NOW, assert_same_report, random_ledger


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with engine.begin() as conn:
        for record in random_ledger(200):
            insert_usage(conn, record)
    with Session(engine) as s:
        yield s


def test_overall_from_rollup_equals_overall_from_raw_rows(session: Session) -> None:
    for days in (1, 7, 30, 365):
        window = usage_window(days, NOW)

        from_rollup = overall_usage(session, window).model_dump()
        from_raw = overall_usage(session, window, source="raw").model_dump()

        assert_same_report(from_rollup, from_raw, f"days={days}")
        assert from_rollup["totals"]["requests"] > 0


def test_user_and_task_reports_from_rollup_equal_raw(session: Session) -> None:
    window = usage_window(30, NOW)
    for user_id in ("alice", "bob"):
        rollup = user_usage(session, ADMIN, user_id, window).model_dump()
        raw = user_usage(session, ADMIN, user_id, window, source="raw").model_dump()
        assert_same_report(rollup, raw)
    for task_id in ("t1", "t2", "t3"):
        rollup = task_usage(session, ADMIN, task_id).model_dump()
        raw = task_usage(session, ADMIN, task_id, source="raw").model_dump()
        assert_same_report(rollup, raw)


def test_task_spend_reads_the_rollup_with_the_same_totals(session: Session) -> None:
    spend = usage_queries.task_spend(session.connection(), "t1")
    report = task_usage(session, ADMIN, "t1")

    assert spend.requests == report.totals.requests
    assert spend.total_tokens == report.totals.total_tokens
    assert spend.cost_usd == report.totals.cost_usd


def test_window_of_n_days_starts_at_utc_midnight_n_minus_one_days_ago() -> None:
    late_evening_in_new_york = datetime.fromisoformat("2026-05-19T23:30:00-04:00")

    window = usage_window(3, late_evening_in_new_york)  # already 2026-05-20 in UTC

    assert window.since == datetime(2026, 5, 18, tzinfo=UTC)
    assert window.until == datetime(2026, 5, 21, tzinfo=UTC)


@pytest.mark.parametrize("days", [0, 366])
def test_window_refuses_days_out_of_range(days: int) -> None:
    with pytest.raises(ValueError, match="from 1 to 365"):
        usage_window(days, NOW)


def test_histogram_quantile_interpolates_inside_the_bucket() -> None:
    buckets = [0] * 15
    buckets[4] = 10  # ten calls in (50, 100]

    assert histogram_quantile(0.95, buckets) == pytest.approx(50 + 50 * 0.95)
    assert histogram_quantile(0.5, buckets) == pytest.approx(75.0)


def test_histogram_quantile_first_bucket_starts_at_zero() -> None:
    buckets = [4] + [0] * 14

    assert histogram_quantile(0.5, buckets) == pytest.approx(2.5)


def test_histogram_quantile_in_overflow_is_last_finite_bound() -> None:
    buckets = [1] + [0] * 13 + [99]

    assert histogram_quantile(0.95, buckets) == 120_000.0


def test_histogram_quantile_of_nothing_is_none() -> None:
    assert histogram_quantile(0.95, [0] * 15) is None
