"""The overview's top tasks, top users and spend-by-user chart equal the calls summed by hand
(from-scratch sums of the ledger), for everyone and for one user, with the ended days kept or
not, and when a task's calls made today lift it above the ended days' top five."""

from __future__ import annotations

import dataclasses
import random
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app.access.principal import Principal
from app.core.config import Settings
from app.core.money import pico_to_usd
from app.tracking.record import UsageRecord
from app.tracking.writer import insert_usage, utc_day
from app.web.cache import ClosedDaysCache
from app.web.overview import TOP, Overview, TopTask, TopUser, build_overview
from tests.conftest import make_settings
from tests.usage.ledger import ADMIN, NOW

TODAY = NOW.date()
SINCE = TODAY - timedelta(days=29)
USERS = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", None]
LATE_TASK = "t-late"  # cheap on the ended days, the most expensive once today's calls count


def _record(rng: random.Random, task: str | None, user: str | None, days_ago: int) -> UsageRecord:
    seconds = rng.randint(0, 5 * 3600) if days_ago == 0 else rng.randint(0, 86399)
    return UsageRecord(
        request_id=uuid.uuid4().hex,
        model=rng.choice(["gpt-4o", "gpt-4o-mini", "o3-mini"]),
        status=rng.choice(["success"] * 8 + ["error"]),
        task_id=task,
        user_id=user,
        agent=rng.choice(["fix_agent", "code_agent", None]),
        provider=rng.choice(["openai", "anthropic"]),
        cost_pico_usd=rng.randint(0, 10**10),
        timestamp=NOW.replace(hour=0) - timedelta(days=days_ago, seconds=-seconds),
    )


def ledger_records(seed: int = 5) -> list[UsageRecord]:
    """60 tasks of 1-8 calls each (some older than the window), calls of no task, and the late
    task: 1 call on an ended day, then today calls worth more than any other task."""
    rng = random.Random(seed)
    records = []
    for n in range(60):
        task, user, start = f"t{n:02d}", rng.choice(USERS), rng.randint(0, 40)
        for _ in range(rng.randint(1, 8)):
            records.append(_record(rng, task, user, max(0, start - rng.randint(0, 2))))
    records += [_record(rng, None, rng.choice(USERS), rng.randint(0, 35)) for _ in range(40)]
    records.append(_record(rng, LATE_TASK, "late-user", 3))
    records += [
        dataclasses.replace(_record(rng, LATE_TASK, "late-user", 0), cost_pico_usd=10**11)
        for _ in range(2)
    ]
    return records


@pytest.fixture
def records(engine: Engine) -> list[UsageRecord]:
    made = ledger_records()
    with engine.begin() as conn:
        for record in made:
            insert_usage(conn, record)
    return made


@pytest.fixture
def session(engine: Engine, records: list[UsageRecord]) -> Iterator[Session]:
    with Session(engine) as s:
        yield s


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return make_settings(database_url, "http://127.0.0.1:9", tmp_path)


def in_window(records: list[UsageRecord], user_id: str | None = None) -> list[UsageRecord]:
    return [
        r
        for r in records
        if SINCE <= utc_day(r.timestamp) <= TODAY and (user_id is None or r.user_id == user_id)
    ]


def top_tasks_by_hand(records: list[UsageRecord]) -> list[TopTask]:
    cost: dict[str, int] = defaultdict(int)
    calls: dict[str, int] = defaultdict(int)
    owner: dict[str, str] = {}
    for r in records:
        if r.task_id:
            cost[r.task_id] += r.cost_pico_usd
            calls[r.task_id] += 1
            owner[r.task_id] = max(owner.get(r.task_id, ""), r.user_id or "")
    ranked = sorted(cost, key=lambda t: (-cost[t], t))[:TOP]
    return [TopTask(t, owner[t], pico_to_usd(cost[t]), calls[t]) for t in ranked]


def user_day_by_hand(records: list[UsageRecord]) -> dict[tuple[str, str], int]:
    cells: dict[tuple[str, str], int] = defaultdict(int)
    for r in records:
        cells[(utc_day(r.timestamp).isoformat(), r.user_id or "(none)")] += r.cost_pico_usd
    return dict(cells)


def top_users_by_hand(records: list[UsageRecord]) -> list[TopUser]:
    per_user: dict[str, int] = defaultdict(int)
    for (_, user), pico in user_day_by_hand(records).items():
        per_user[user] += pico
    ranked = sorted(per_user, key=lambda u: (-per_user[u], u))[:TOP]
    return [TopUser(u, pico_to_usd(per_user[u])) for u in ranked]


def chart_cells(overview: Overview) -> dict[tuple[str, str], int]:
    """The by-user chart back in picodollars per (day, user), "other" and zeros left out."""
    chart = overview.chart_by_user
    assert chart is not None
    return {
        (day, dataset["label"]): round(value * 10**12)
        for dataset in chart["datasets"]
        if dataset["label"] != "other"
        for day, value in zip(chart["labels"], dataset["data"], strict=True)
        if value
    }


@pytest.mark.parametrize("kept", [False, True], ids=["nothing-kept", "ended-days-kept"])
def test_an_administrators_top_tasks_users_and_chart_are_the_calls_summed_by_hand(
    session: Session, settings: Settings, records: list[UsageRecord], kept: bool
) -> None:
    cache = ClosedDaysCache() if kept else None
    window = in_window(records)

    first = build_overview(session, settings, ADMIN, NOW, closed_days=cache)
    again = build_overview(session, settings, ADMIN, NOW, closed_days=cache)

    expected = top_tasks_by_hand(window)
    assert expected[0].task_id == LATE_TASK  # today's calls lift it to the top
    for overview in (first, again):
        assert overview.top_tasks == expected
        assert overview.top_users == top_users_by_hand(window)
        drawn = chart_cells(overview)
        shown = {user for _, user in drawn}
        by_hand = {c: p for c, p in user_day_by_hand(window).items() if c[1] in shown}
        assert len(shown) == 8  # the chart's series; the 9th user's spend is "other"
        assert drawn.keys() == by_hand.keys()
        assert all(abs(by_hand[cell] - pico) <= 1 for cell, pico in drawn.items())  # floats


def test_the_late_task_is_outside_the_ended_days_top_five(records: list[UsageRecord]) -> None:
    """The case the kept ranking must merge: without today's calls it ranks below five."""
    ended = [r for r in in_window(records) if utc_day(r.timestamp) < TODAY]
    assert LATE_TASK not in [t.task_id for t in top_tasks_by_hand(ended)]


@pytest.mark.parametrize("user_id", ["alice", "late-user"])
def test_a_users_top_tasks_are_their_calls_summed_by_hand(
    session: Session, settings: Settings, records: list[UsageRecord], user_id: str
) -> None:
    overview = build_overview(session, settings, Principal(user_id, "user"), NOW)

    assert overview.top_tasks == top_tasks_by_hand(in_window(records, user_id))
    assert overview.top_users == [] and overview.chart_by_user is None
