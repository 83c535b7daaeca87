"""Revision 0016 fills the usage rollups' waste sums and the hourly spend from ``llm_usage``:
what the usage writer would have added row by row. Its downgrade removes them."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Engine, inspect, text

from app.core.migrations import alembic_config, upgrade_to_head
from app.tracking.record import UsageRecord
from tests.usage.ledger import random_ledger, write_ledger

WASTE = (
    "error_cost_pico_usd", "truncated_calls", "truncated_cost_pico_usd", "retried_calls",
    "retry_attempts", "retried_cost_pico_usd",
)  # fmt: skip
TABLES = {
    "usage_rollup_daily": ("day", "user_id", "task_id", "model", "agent", "provider", "operation"),
    "usage_rollup_user_daily": ("user_id", "day", "model", "provider", "operation"),
    "usage_rollup_daily_overall": ("day", "model", "agent", "provider", "operation"),
}


@pytest.fixture
def ledger(engine: Engine, database_url: str) -> Iterator[list[UsageRecord]]:
    records = write_ledger(engine, random_ledger(400, seed=16))
    yield records
    upgrade_to_head(database_url)  # for the next test, even if this one failed half-way


def _hour(value: Any) -> datetime:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _sums(engine: Engine) -> dict[str, dict[tuple[Any, ...], tuple[int, ...]]]:
    """Each rollup's waste sums and the hourly spend, key -> sums (rows of all zeros left out)."""
    found: dict[str, dict[tuple[Any, ...], tuple[int, ...]]] = {}
    with engine.connect() as conn:
        for table, key in TABLES.items():
            rows = conn.execute(text(f"SELECT {', '.join(key)}, {', '.join(WASTE)} FROM {table}"))
            found[table] = {
                tuple(str(v) for v in row[: len(key)]): tuple(row[len(key) :])
                for row in rows
                if any(row[len(key) :])
            }
        rows = conn.execute(
            text("SELECT user_id, hour, model, requests, cost_pico_usd FROM usage_rollup_hourly")
        )
        found["usage_rollup_hourly"] = {(r[0], _hour(r[1]), r[2]): (r[3], r[4]) for r in rows}
    return found


def test_the_upgrade_fills_what_the_writer_adds_row_by_row(
    engine: Engine, database_url: str, ledger: list[UsageRecord]
) -> None:
    written = _sums(engine)  # by the writer, one row at a time
    assert all(written[table] for table in (*TABLES, "usage_rollup_hourly"))
    hours = {(r.user_id or "", r.model) for r in ledger}
    assert {(u, m) for u, _h, m in written["usage_rollup_hourly"]} == hours
    assert sum(c for _n, c in written["usage_rollup_hourly"].values()) == sum(
        r.cost_pico_usd for r in ledger
    )

    command.downgrade(alembic_config(database_url), "0015")
    columns = {c["name"] for c in inspect(engine).get_columns("usage_rollup_daily")}
    assert not columns & set(WASTE)
    assert "usage_rollup_hourly" not in inspect(engine).get_table_names()

    upgrade_to_head(database_url)
    assert _sums(engine) == written
