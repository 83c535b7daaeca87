"""The recompute's inputs and its audit records, as the API and the command show them."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import InvalidInput, NotFound
from app.core.money import pico_to_usd
from app.models import PriceRecompute
from app.prices.recompute import RecomputeScope
from app.schemas.prices import RecomputeRun

LIST_LIMIT = 100


def as_utc(name: str, value: datetime | None) -> datetime | None:
    """Naive datetimes are taken as UTC; ones that leave the calendar in UTC are refused."""
    if value is None:
        return None
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except (OverflowError, ValueError) as exc:
        raise InvalidInput(f"{name} is out of range.") from exc


def scope_of(
    since: datetime | None,
    until: datetime | None,
    model: str | None = None,
    provider: str | None = None,
    *,
    now: datetime | None = None,
) -> RecomputeScope:
    """The scope of a run; ``InvalidInput`` for an empty or reversed range."""
    start = as_utc("since", since)
    end = as_utc("until", until) or now or datetime.now(UTC)
    if start is not None and start >= end:
        raise InvalidInput("since must be before until.", since=start.isoformat())
    return RecomputeScope(until=end, since=start, model=model, provider=provider)


def _aware(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def run_view(row: PriceRecompute) -> RecomputeRun:
    before, after = row.cost_before_pico_usd, row.cost_after_pico_usd
    until = _aware(row.until)
    assert until is not None
    started = _aware(row.started_at)
    assert started is not None
    values: dict[str, Any] = {
        "id": row.id,
        "actor": row.actor,
        "status": row.status,
        "dry_run": row.dry_run,
        "started_at": started,
        "finished_at": _aware(row.finished_at),
        "since": _aware(row.since),
        "until": until,
        "model": row.model,
        "provider": row.provider,
        "price_sources": json.loads(row.price_sources),
        "sources_before": json.loads(row.sources_before),
        "sources_after": json.loads(row.sources_after),
        "rows_examined": row.rows_examined,
        "rows_changed": row.rows_changed,
        "cost_before_usd": pico_to_usd(before),
        "cost_after_usd": pico_to_usd(after),
        "cost_delta_usd": pico_to_usd(after - before),
        "unpriced_before": row.unpriced_before,
        "unpriced_after": row.unpriced_after,
        "error": row.error,
    }
    return RecomputeRun(**values)


def get_run(session: Session, run_id: str) -> RecomputeRun:
    row = session.get(PriceRecompute, run_id)
    if row is None:
        raise NotFound("No such recompute run.", run_id=run_id)
    return run_view(row)


def list_runs(session: Session, limit: int = LIST_LIMIT) -> list[RecomputeRun]:
    """The latest runs first."""
    rows = session.scalars(
        select(PriceRecompute).order_by(PriceRecompute.started_at.desc()).limit(limit)
    )
    return [run_view(row) for row in rows]
