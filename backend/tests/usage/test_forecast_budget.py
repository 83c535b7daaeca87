"""``budget.forecast_over``: a user's month-end forecast above their monthly budget, told once a
month, through the outbox, on real databases."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session

from app.budgets.limits import set_override
from app.core.db import create_session_factory, transaction
from app.core.money import PICO_PER_USD
from app.models import BudgetScope, NotificationEvent
from app.tracking.record import UsageRecord
from app.tracking.writer import insert_usage
from app.usage.forecast import forecast_spend, forecasts_over_budget, record_forecasts_over_budget
from tests.notifications.conftest import notify_settings

NOW = datetime(2026, 3, 11, 12, 0, tzinfo=UTC)


def spend_daily(engine: Engine, user: str, usd: int, days: int = 60) -> None:
    """``usd`` a day for ``days`` days up to NOW (today's included)."""
    with engine.begin() as conn:
        for back in range(days + 1):
            insert_usage(
                conn,
                UsageRecord(
                    request_id=uuid.uuid4().hex,
                    model="m",
                    status="success",
                    user_id=user,
                    cost_pico_usd=usd * PICO_PER_USD,
                    timestamp=NOW - timedelta(days=back, hours=1),
                ),
            )


def forecast_events(engine: Engine) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(NotificationEvent.id, NotificationEvent.payload).where(
                NotificationEvent.kind == "budget.forecast_over"
            )
        ).all()
    return {event_id: json.loads(payload) for event_id, payload in rows}


def test_a_forecast_over_the_monthly_budget_is_told_once_a_month(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    # alice: $10 a day heads for $315 in March; bob: $1 a day for $31.50. The default budget
    # is $200 a month; an administrator gave bob $20.
    settings = notify_settings(database_url, tmp_path, budget_user_monthly_usd=Decimal(200))
    spend_daily(engine, "alice", 10)
    spend_daily(engine, "bob", 1)
    spend_daily(engine, "carol", 1)  # $31.50 of $200: nothing to say
    with transaction(create_session_factory(engine)) as session:
        set_override(
            session,
            settings,
            BudgetScope.USER_MONTHLY,
            "bob",
            limit_usd=Decimal(20),
            soft_threshold=None,
            updated_by="root",
        )

    assert record_forecasts_over_budget(engine, settings, NOW) == 2
    assert record_forecasts_over_budget(engine, settings, NOW + timedelta(hours=5)) == 0
    events = forecast_events(engine)
    assert sorted(events) == [
        "budget.forecast_over:user_monthly:alice:2026-03",
        "budget.forecast_over:user_monthly:bob:2026-03",
    ]
    alice = events["budget.forecast_over:user_monthly:alice:2026-03"]
    assert alice["subject_user_id"] == "alice"
    assert alice["data"] == {
        "scope": "user_monthly",
        "subject_id": "alice",
        "month": "2026-03",
        "limit_usd": "200",
        "projected_usd": "315.000000",
        "low_usd": "315.000000",
        "high_usd": "315.000000",
        "spent_usd": "110",
    }


def test_no_budget_no_spend_no_event(engine: Engine, database_url: str, tmp_path: Path) -> None:
    settings = notify_settings(database_url, tmp_path)  # no monthly budget at all
    assert record_forecasts_over_budget(engine, settings, NOW) == 0
    spend_daily(engine, "alice", 10, days=3)
    assert record_forecasts_over_budget(engine, settings, NOW) == 0
    assert forecast_events(engine) == {}


def _selects_of(engine: Engine, run: Callable[[], object]) -> int:
    """How many SELECT statements ``run`` sends to ``engine``."""
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        run()
    finally:
        event.remove(engine, "before_cursor_execute", count)
    return len(seen)


def test_the_scan_reads_every_user_at_once_and_agrees_with_each_forecast(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    settings = notify_settings(database_url, tmp_path, budget_user_monthly_usd=Decimal(50))
    for n in range(3):
        spend_daily(engine, f"user-{n}", n + 1, days=20 + 10 * n)
    with Session(engine) as session:
        few = _selects_of(engine, lambda: forecasts_over_budget(session, settings, NOW))
    for n in range(3, 12):
        spend_daily(engine, f"user-{n}", n + 1, days=5 + 5 * n)
    with Session(engine) as session:
        found: list[Any] = []
        many = _selects_of(
            engine, lambda: found.extend(forecasts_over_budget(session, settings, NOW))
        )
        # The same figures as each user's own forecast (the API's), one user at a time.
        for forecast, limit_pico in found:
            assert forecast == forecast_spend(session, forecast.user_id, NOW)
            assert limit_pico == 50 * PICO_PER_USD
    assert many == few <= 3  # the users' days and the overrides: not one query per user
    # $1..$12 a day heads for $31.50..$378 in March: over $50 from $2 a day (user-1) on.
    assert sorted(f.user_id for f, _ in found) == sorted(f"user-{n}" for n in range(1, 12))
