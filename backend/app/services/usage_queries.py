"""Reads of the usage ledger. All SQL over ``llm_usage`` and its rollup lives here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy import Connection, func, select

from app.core.money import pico_to_usd
from app.models import LLMUsage


@dataclass(frozen=True, slots=True)
class SpendTotals:
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: Decimal


def _totals(conn: Connection, *conditions: object) -> SpendTotals:
    stmt = select(
        func.count(LLMUsage.id),
        func.coalesce(func.sum(LLMUsage.prompt_tokens), 0),
        func.coalesce(func.sum(LLMUsage.completion_tokens), 0),
        func.coalesce(func.sum(LLMUsage.total_tokens), 0),
        func.coalesce(func.sum(LLMUsage.cost_pico_usd), 0),
    ).where(*conditions)  # type: ignore[arg-type]
    row = conn.execute(stmt).one()
    return SpendTotals(
        requests=int(row[0]),
        prompt_tokens=int(row[1]),
        completion_tokens=int(row[2]),
        total_tokens=int(row[3]),
        cost_usd=pico_to_usd(int(row[4])),
    )


def task_spend(conn: Connection, task_id: str) -> SpendTotals:
    """Everything a task's calls have cost (all time)."""
    return _totals(conn, LLMUsage.task_id == task_id)


def user_spend(conn: Connection, user_id: str, days: int = 30) -> SpendTotals:
    """A user's spend over the last ``days`` days."""
    since = datetime.now(UTC) - timedelta(days=days)
    return _totals(conn, LLMUsage.user_id == user_id, LLMUsage.timestamp >= since)
