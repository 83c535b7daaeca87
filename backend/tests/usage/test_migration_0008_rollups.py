"""Revision 0008 rebuilds the usage rollups keyed by provider and operation, and the per-user
rollup, from ``llm_usage``: every report says what it said before, and calls whose rows
retention had pruned stay counted (under an unknown provider and operation). Its downgrade
gives the old rollups back with the same sums."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, delete, func, inspect, select, text
from sqlalchemy.orm import Session

from app.core.migrations import alembic_config, upgrade_to_head
from app.models import LLMUsage
from app.tracking.record import UsageRecord
from app.tracking.writer import ROLLUP_SUM_FIELDS
from tests.usage.ledger import NOW, random_ledger, write_ledger
from tests.usage.test_rollups import every_report

# The revision before 0008, whatever it is pointed at.
BEFORE = str(
    ScriptDirectory.from_config(alembic_config("sqlite://")).get_revision("0008").down_revision
)
OLD_KEY = ("day", "user_id", "task_id", "model", "agent")
KEYS = (*OLD_KEY, "provider", "operation")
SUMS = (*ROLLUP_SUM_FIELDS,)


@pytest.fixture
def ledger(engine: Engine, database_url: str) -> Iterator[list[UsageRecord]]:
    records = write_ledger(engine, random_ledger(300, seed=5))
    yield records
    upgrade_to_head(database_url)  # for the next test, even if this one failed half-way


def _reports(engine: Engine) -> dict[str, Any]:
    with Session(engine) as session:
        return every_report(session)


def _old_rollup(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return sorted(
            tuple(row)
            for row in conn.execute(
                text(
                    f"SELECT {', '.join(OLD_KEY)}, SUM(requests), SUM(cost_pico_usd), "
                    f"SUM(lat_b07) FROM usage_rollup_daily GROUP BY {', '.join(OLD_KEY)}"
                )
            )
        )


def _rollup_rows(engine: Engine) -> dict[str, dict[tuple[Any, ...], tuple[Any, ...]]]:
    """Every rollup table's rows, key -> sums (latency sums rounded: added in another order)."""
    tables = {
        "usage_rollup_daily": KEYS,
        "usage_rollup_user_daily": ("user_id", "day", "model", "provider", "operation"),
        "usage_rollup_daily_overall": ("day", "model", "agent", "provider", "operation"),
    }
    rows: dict[str, dict[tuple[Any, ...], tuple[Any, ...]]] = {}
    with engine.connect() as conn:
        for table, key in tables.items():
            found = conn.execute(text(f"SELECT {', '.join(key)}, {', '.join(SUMS)} FROM {table}"))
            rows[table] = {
                tuple(str(v) for v in row[: len(key)]): tuple(
                    round(v, 6) if isinstance(v, float) else v for v in row[len(key) :]
                )
                for row in found
            }
    return rows


def test_the_rebuilt_rollups_are_row_for_row_what_the_writer_wrote(
    engine: Engine, database_url: str, ledger: list[UsageRecord]
) -> None:
    """What ``bench/seed_usage.py`` relies on to fill its rollups through this revision."""
    written = _rollup_rows(engine)

    command.downgrade(alembic_config(database_url), BEFORE)
    upgrade_to_head(database_url)

    assert _rollup_rows(engine) == written
    assert all(written.values())


def test_reports_are_unchanged_through_a_downgrade_and_upgrade(
    engine: Engine, database_url: str, ledger: list[UsageRecord]
) -> None:
    before, old_sums = _reports(engine), _old_rollup(engine)

    command.downgrade(alembic_config(database_url), BEFORE)
    columns = {c["name"] for c in inspect(engine).get_columns("usage_rollup_daily")}
    assert "provider" not in columns
    assert "usage_rollup_user_daily" not in inspect(engine).get_table_names()
    assert _old_rollup(engine) == old_sums
    upgrade_to_head(database_url)

    assert _reports(engine) == before


def test_calls_pruned_before_the_upgrade_stay_counted_as_of_unknown_provider(
    engine: Engine, database_url: str, ledger: list[UsageRecord]
) -> None:
    before = _reports(engine)
    command.downgrade(alembic_config(database_url), BEFORE)
    cutoff = NOW - timedelta(days=20)
    pruned = [r for r in ledger if r.timestamp < cutoff]
    with engine.begin() as conn:  # what retention does: rows go, the rollups stay
        conn.execute(delete(LLMUsage).where(LLMUsage.timestamp < cutoff))
        assert conn.execute(select(func.count()).select_from(LLMUsage)).scalar_one() == len(
            ledger
        ) - len(pruned)

    upgrade_to_head(database_url)

    after = _reports(engine)
    for name, report in before.items():
        for part in ("totals", "by_model", "by_day", "by_agent"):
            assert after[name].get(part) == report.get(part), (name, part)
    year = after["overall/365"]
    unknown = {p["provider"]: p["requests"] for p in year["by_provider"]}[None]
    assert unknown == len(pruned)  # the ledger spans 40 days, all in the year
    assert {o["operation"]: o["requests"] for o in year["by_operation"]}[None] == unknown
    alice = after["user/alice/30"]
    assert sum(p["requests"] for p in alice["by_provider"]) == alice["totals"]["requests"]
