"""Pruning raw usage rows in batches keeps every report whole (the rollup is not pruned)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from app.access.principal import Principal
from app.models import LLMUsage, UsageRollupDaily
from app.tracking.record import UsageRecord
from app.tracking.writer import insert_usage
from app.usage.report import task_usage
from app.usage.retention import RetentionScheduler, main, prune_raw_usage, retention_cutoff

NOW = datetime(2026, 4, 30, 18, 0, tzinfo=UTC)
KEEP_FROM = datetime(2026, 4, 1, tzinfo=UTC)  # 30 days kept at NOW: Apr 1 .. Apr 30


def insert_at(engine: Engine, *stamps: datetime, task_id: str = "t1") -> list[str]:
    ids = []
    with engine.begin() as conn:
        for stamp in stamps:
            record = UsageRecord(
                request_id=uuid.uuid4().hex,
                model="gpt-4o-mini",
                status="success",
                task_id=task_id,
                user_id="alice",
                prompt_tokens=100,
                cost_pico_usd=7,
                timestamp=stamp,
            )
            insert_usage(conn, record)
            ids.append(record.request_id)
    return ids


def remaining(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(select(LLMUsage.request_id)))


def test_cutoff_keeps_whole_utc_days() -> None:
    assert retention_cutoff(30, NOW) == KEEP_FROM
    assert retention_cutoff(1, NOW) == datetime(2026, 4, 30, tzinfo=UTC)


def test_prunes_rows_before_the_cutoff_and_keeps_the_boundary(engine: Engine) -> None:
    old = insert_at(engine, KEEP_FROM - timedelta(microseconds=1), KEEP_FROM - timedelta(days=90))
    kept = insert_at(engine, KEEP_FROM, NOW)

    result = prune_raw_usage(engine, 30, now=NOW)

    assert result.deleted == len(old)
    assert result.cutoff == KEEP_FROM
    assert remaining(engine) == set(kept)


def test_prunes_in_batches_until_done(engine: Engine) -> None:
    insert_at(engine, *(KEEP_FROM - timedelta(hours=h + 1) for h in range(7)))
    kept = insert_at(engine, NOW)

    result = prune_raw_usage(engine, 30, batch_size=3, now=NOW)

    assert (result.deleted, result.batches) == (7, 3)  # 3 + 3 + 1
    assert remaining(engine) == set(kept)


def test_rollup_and_task_report_survive_pruning(engine: Engine) -> None:
    insert_at(engine, KEEP_FROM - timedelta(days=40), KEEP_FROM - timedelta(days=1), NOW)
    admin = Principal("root", "admin")
    with Session(engine) as session:
        before = task_usage(session, admin, "t1")

    prune_raw_usage(engine, 30, now=NOW)

    with Session(engine) as session:
        after = task_usage(session, admin, "t1")
        rollup_rows = session.scalar(select(func.count()).select_from(UsageRollupDaily))
    assert len(remaining(engine)) == 1
    assert after == before
    assert after.totals.requests == 3
    assert rollup_rows == 3


def test_nothing_to_prune_is_one_empty_batch(engine: Engine) -> None:
    insert_at(engine, NOW)

    result = prune_raw_usage(engine, 30, now=NOW)

    assert (result.deleted, result.batches) == (0, 1)


@pytest.mark.parametrize(("days", "batch"), [(0, 10), (30, 0)])
def test_refuses_nonsense_arguments(engine: Engine, days: int, batch: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        prune_raw_usage(engine, days, batch)


def test_cli_prunes_the_given_database(
    engine: Engine, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    now = datetime.now(UTC)
    insert_at(engine, now - timedelta(days=400))
    kept = insert_at(engine, now)

    status = main(["--days", "90", "--batch-size", "500", "--database-url", database_url])

    assert status == 0
    assert "deleted 1 rows" in capsys.readouterr().out
    assert remaining(engine) == set(kept)


def test_the_service_prunes_by_itself_when_retention_is_configured(engine: Engine) -> None:
    old = datetime.now(UTC) - timedelta(days=40)
    with engine.begin() as conn:
        insert_usage(
            conn, UsageRecord(request_id="old", model="m", status="success", timestamp=old)
        )
        insert_usage(conn, UsageRecord(request_id="new", model="m", status="success"))

    scheduler = RetentionScheduler(engine, older_than_days=30, batch_size=100, interval=3600)
    scheduler.start()
    scheduler.stop()  # the first prune runs at start; stop waits for it

    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(LLMUsage)) == 1
