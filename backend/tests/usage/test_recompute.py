"""Repricing past rows (``app.prices.recompute``) on SQLite and PostgreSQL: the rows, every
usage rollup, the budget counters and the task metrics move together and exactly."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from app.budgets.store import CounterKey, seed_counters
from app.core.errors import ServiceUnavailable
from app.core.money import pico_to_usd, usd_to_pico
from app.core.prepared import Tx
from app.core.runtime import Runtime
from app.models import (
    BudgetCounter,
    BudgetScope,
    LLMUsage,
    PriceRecompute,
    PriceSourceRow,
    TaskMetrics,
    TaskMetricsDaily,
    UsageRollupDaily,
    UsageRollupDailyOverall,
    UsageRollupHourly,
    UsageRollupUserDaily,
)
from app.prices.recompute import INTERRUPTED, RecomputeScope, recompute_prices
from app.tasks.metrics_writer import record_task_metrics
from app.tracking.pricing import PriceBook, TokenUsage
from app.tracking.record import UsageRecord
from app.tracking.spool import UsageSpool
from app.tracking.writer import UsageWriter, insert_usage, utc_day, utc_hour

M = Decimal(1_000_000)
LLAMA = {
    "input_mtok": Decimal("0.20"),
    "output_mtok": Decimal("0.40"),
    "cache_read_mtok": Decimal("0.05"),
}
NOW = datetime.now(UTC).replace(microsecond=0)
TODAY = NOW.date()
USERS = ("alice", "bob", None)
TASKS = ("t1", "t2", None)
MODELS = ("gpt-4o-mini", "my-llama", "claude-sonnet-4-5")
ROLLUP_KEYS: dict[type, tuple[str, ...]] = {
    UsageRollupDaily: ("day", "user_id", "task_id", "model", "agent", "provider", "operation"),
    UsageRollupUserDaily: ("user_id", "day", "model", "provider", "operation"),
    UsageRollupDailyOverall: ("day", "model", "agent", "provider", "operation"),
    UsageRollupHourly: ("user_id", "hour", "model"),
}
# What each rollup sums, as (column, the row's contribution): the cost, the unpriced calls and
# the waste sums (revision 0016; the hourly rollup has the cost only).
ROLLUP_SUMS: tuple[tuple[str, Any], ...] = (
    ("cost_pico_usd", lambda r: r.cost_pico_usd),
    ("unpriced_calls", lambda r: int(r.cost_status == "unpriced" and r.status != "blocked")),
    ("error_cost_pico_usd", lambda r: r.cost_pico_usd if r.status == "error" else 0),
    ("truncated_calls", lambda r: int(r.finish_reason == "length")),
    ("truncated_cost_pico_usd", lambda r: r.cost_pico_usd if r.finish_reason == "length" else 0),
    ("retried_calls", lambda r: int(r.attempts > 1)),
    ("retry_attempts", lambda r: max(r.attempts - 1, 0)),
    ("retried_cost_pico_usd", lambda r: r.cost_pico_usd if r.attempts > 1 else 0),
)


def tracked(
    book: PriceBook,
    rng: random.Random,
    *,
    at: datetime | None = None,
    tasks: tuple[str | None, ...] = TASKS,
) -> UsageRecord:
    """A call as the tracker records it: priced by ``book`` with its provenance."""
    model = rng.choice(MODELS)
    status = rng.choice(["success"] * 7 + ["error", "blocked"])
    prompt = 0 if status != "success" else rng.randint(1, 300_000)
    tokens = TokenUsage(prompt, rng.randint(0, 2000) if prompt else 0, rng.randint(0, prompt))
    resolved = book.resolve(model)
    quote = book.quote(model, tokens, at=at or NOW)
    priced = quote.status != "unpriced" and status == "success"
    return UsageRecord(
        request_id=uuid.uuid4().hex,
        model=model,
        status=status,
        task_id=rng.choice(tasks),
        user_id=rng.choice(USERS),
        agent=rng.choice(["fix_agent", None]),
        provider=resolved.provider,
        operation=rng.choice(["chat", "responses"]),
        prompt_tokens=tokens.prompt_tokens,
        completion_tokens=tokens.completion_tokens,
        cached_tokens=tokens.cached_tokens,
        cost_pico_usd=usd_to_pico(quote.cost_usd) if priced else 0,
        cost_status=quote.status if status == "success" else "priced",
        price_source=quote.ref if priced else None,
        price_entry=quote.entry if priced else None,
        price_tier=quote.tier if priced else None,
        latency_ms=rng.uniform(1, 5000),
        timestamp=at or NOW - timedelta(seconds=rng.randint(0, 2 * 86400)),
    )


def counter_keys() -> list[CounterKey]:
    keys = [CounterKey(BudgetScope.GLOBAL_DAILY, "", TODAY - timedelta(days=d)) for d in (0, 1, 2)]
    keys += [CounterKey(BudgetScope.TASK, t, date(1970, 1, 1)) for t in (*TASKS, "t3") if t]
    for user in (u for u in USERS if u):
        keys += [
            CounterKey(BudgetScope.USER_DAILY, user, TODAY - timedelta(days=d)) for d in (0, 1)
        ]
        keys.append(CounterKey(BudgetScope.USER_MONTHLY, user, TODAY.replace(day=1)))
    return keys


@pytest.fixture
def ledger(engine: Engine) -> list[UsageRecord]:
    """300 calls of the last two days priced with the bundled prices (``my-llama`` unpriced),
    written after the budget counters exist (so the spend trigger books them), and finished
    tasks ``t1`` and ``t2`` with their cost metrics."""
    with engine.begin() as conn:
        seed_counters(Tx.of(conn), counter_keys(), NOW)
    rng, book = random.Random(5), PriceBook()
    records = [tracked(book, rng) for _ in range(300)]
    # Waste whose cost a recompute moves: truncated and retried answers, and failed calls that
    # reported their usage (partial: priced from their tokens).
    waste = random.Random(6)
    for i, record in enumerate(records):
        if record.status == "success" and waste.random() < 0.4:
            records[i] = dataclasses.replace(
                record,
                finish_reason=waste.choice(["length", "stop"]),
                attempts=waste.choice([1, 2, 3]),
            )
    for _ in range(30):
        record = tracked(book, rng)
        if record.status == "success":
            records.append(dataclasses.replace(record, status="error", is_partial=True))
    with engine.begin() as conn:
        for record in records:
            insert_usage(conn, record)
        for task in ("t1", "t2"):
            cost = sum(r.cost_pico_usd for r in records if r.task_id == task)
            metrics = {"succeeded": Decimal(1), "cost_usd": pico_to_usd(cost)}
            record_task_metrics(conn, task, metrics, NOW)
    return records


def rows(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(LLMUsage.__table__)).all())


def assert_consistent(engine: Engine) -> None:
    """Every rollup, budget counter and task cost metric equals the sum of the rows."""
    ledger = rows(engine)
    with engine.connect() as conn:
        for table, key in ROLLUP_KEYS.items():
            hourly = table is UsageRollupHourly
            columns = ("cost_pico_usd",) if hourly else tuple(n for n, _ in ROLLUP_SUMS)
            expected: dict[tuple[Any, ...], list[int]] = {}
            for row in ledger:
                values = {
                    "day": utc_day(row.timestamp), "user_id": row.user_id or "",
                    "task_id": row.task_id or "", "model": row.model, "agent": row.agent or "",
                    "provider": row.provider, "operation": row.operation,
                    "hour": utc_hour(row.timestamp),
                }  # fmt: skip
                k = tuple(values[name] for name in key)
                sums = expected.setdefault(k, [0] * len(columns))
                for i, (_name, of) in enumerate(ROLLUP_SUMS[: len(columns)]):
                    sums[i] += of(row)
            t = table.__table__.c  # type: ignore[attr-defined]
            found = conn.execute(select(*(t[n] for n in key), *(t[n] for n in columns)))
            got = {_key(r[: len(key)]): list(r[len(key) :]) for r in found}
            want = {_key(k): v for k, v in expected.items()}
            assert {k: v for k, v in got.items() if any(v)} == {
                k: v for k, v in want.items() if any(v)
            }, table.__tablename__  # type: ignore[attr-defined]
        for c in conn.execute(select(BudgetCounter.__table__)).all():
            day = c.window_start
            mine = [
                r.cost_pico_usd
                for r in ledger
                if (c.scope == "task" and r.task_id == c.subject_id)
                or (c.scope == "global_daily" and utc_day(r.timestamp) == day)
                or (
                    c.scope == "user_daily"
                    and r.user_id == c.subject_id
                    and utc_day(r.timestamp) == day
                )
                or (
                    c.scope == "user_monthly"
                    and r.user_id == c.subject_id
                    and utc_day(r.timestamp).replace(day=1) == day
                )
            ]
            assert c.spent_pico_usd == sum(mine), (c.scope, c.subject_id, day)
        metrics = TaskMetrics.__table__.c
        costs = conn.execute(
            select(metrics.task_id, metrics.metric_value).where(metrics.metric_name == "cost_usd")
        ).all()
        for task_id, value in costs:
            spent = sum(r.cost_pico_usd for r in ledger if r.task_id == task_id)
            assert usd_to_pico(Decimal(str(value))) == spent, task_id
        daily = conn.execute(select(func.sum(TaskMetricsDaily.cost_pico_usd))).scalar()
        assert daily == sum(usd_to_pico(Decimal(str(v))) for _, v in costs)


def _key(values: Sequence[Any]) -> tuple[Any, ...]:
    """A rollup key comparable across dialects (SQLite returns a naive UTC hour)."""
    return tuple(
        v.replace(tzinfo=UTC) if isinstance(v, datetime) and v.tzinfo is None else v for v in values
    )


def scope(**kwargs: Any) -> RecomputeScope:
    return RecomputeScope(until=NOW + timedelta(seconds=1), **kwargs)


def audit_of(engine: Engine, run_id: str) -> PriceRecompute:
    with Session(engine) as session:
        run = session.get(PriceRecompute, run_id)
        assert run is not None
        return run


def test_an_override_added_after_the_fact_prices_the_unpriced_rows_and_moves_everything(
    engine: Engine, ledger: list[UsageRecord]
) -> None:
    assert_consistent(engine)
    before = {r.id: r for r in rows(engine)}
    book = PriceBook({"my-llama": LLAMA})

    run_id = recompute_prices(engine, book, scope(), actor="ops", batch_rows=37)

    after = {r.id: r for r in rows(engine)}
    # Successes, and failed calls that reported their usage (priced from their tokens too).
    costed = [r for r in ledger if r.status == "success" or r.is_partial]
    repriced = [r for r in costed if r.model == "my-llama"]
    assert len(repriced) > 20
    assert any(r.status == "error" for r in repriced)
    assert any(r.finish_reason == "length" for r in repriced)
    assert any(r.attempts > 1 for r in repriced)
    ref = book.overrides_source.ref if book.overrides_source else None
    added = 0
    for record in repriced:
        row = after[record.id]
        # by hand, from the per-million prices above
        cost = (
            (record.prompt_tokens - record.cached_tokens) * LLAMA["input_mtok"]
            + record.cached_tokens * LLAMA["cache_read_mtok"]
            + record.completion_tokens * LLAMA["output_mtok"]
        ) / M
        assert (row.cost_pico_usd, row.cost_status) == (usd_to_pico(cost), "priced")
        assert (row.price_source, row.price_entry) == (ref, "my-llama")
        added += row.cost_pico_usd
    unchanged = [i for i in before if i not in {r.id for r in repriced}]
    assert all(after[i] == before[i] for i in unchanged)
    assert_consistent(engine)
    run = audit_of(engine, run_id)
    assert (run.status, run.actor, run.dry_run) == ("done", "ops", False)
    assert run.rows_changed == len(repriced)
    assert run.cost_after_pico_usd - run.cost_before_pico_usd == added
    assert (run.unpriced_before - run.unpriced_after) == len(repriced)
    assert json.loads(run.sources_after)[ref] == len(repriced)
    assert json.loads(run.price_sources) == [s.ref for s in book.sources]
    with Session(engine) as session:
        described = {s.ref: s.kind for s in session.scalars(select(PriceSourceRow))}
    assert described == {s.ref: s.kind for s in book.sources}


def test_a_dry_run_changes_nothing_and_reports_the_totals_before_and_after(
    engine: Engine, ledger: list[UsageRecord]
) -> None:
    before = rows(engine)
    book = PriceBook({"my-llama": LLAMA})

    dry = audit_of(engine, recompute_prices(engine, book, scope(), actor="ops", dry_run=True))

    assert rows(engine) == before
    applied = audit_of(engine, recompute_prices(engine, book, scope(), actor="ops"))
    assert dry.dry_run and not applied.dry_run
    for name in ("rows_changed", "cost_before_pico_usd", "cost_after_pico_usd", "unpriced_after"):
        assert getattr(dry, name) == getattr(applied, name), name
    assert dry.rows_changed > 0


def test_a_second_run_with_the_same_prices_changes_nothing(
    engine: Engine, ledger: list[UsageRecord]
) -> None:
    book = PriceBook({"my-llama": LLAMA})
    recompute_prices(engine, book, scope(), actor="ops")
    once = rows(engine)

    again = audit_of(engine, recompute_prices(engine, book, scope(), actor="ops"))

    assert again.rows_changed == 0 and rows(engine) == once
    assert again.cost_before_pico_usd == again.cost_after_pico_usd


def test_only_rows_in_the_scope_are_repriced(engine: Engine, ledger: list[UsageRecord]) -> None:
    cheap = {"claude-sonnet-4-5": {"input_mtok": Decimal("1"), "output_mtok": Decimal("2")}}
    since = NOW - timedelta(days=1)
    in_scope = {
        r.id
        for r in ledger
        if r.model == "claude-sonnet-4-5"
        and (r.status == "success" or r.is_partial)
        and r.timestamp >= since
    }
    before = {r.id: r for r in rows(engine)}

    run = audit_of(
        engine,
        recompute_prices(
            engine, PriceBook(cheap), scope(since=since, provider="anthropic"), actor="ops"
        ),
    )

    after = {r.id: r for r in rows(engine)}
    changed = {i for i in after if after[i] != before[i]}
    assert changed == in_scope and run.rows_changed == len(in_scope) > 5
    assert_consistent(engine)


def test_rows_the_live_path_refused_to_price_stay_unpriced(engine: Engine) -> None:
    """``absurd_tokens`` rows were recorded unpriced whatever the price; blocked calls cost 0."""
    records = [
        UsageRecord(
            request_id=uuid.uuid4().hex, model="gpt-4o-mini", status="success",
            cost_status="unpriced", flags="absurd_tokens", timestamp=NOW,
        ),
        UsageRecord(
            request_id=uuid.uuid4().hex, model="gpt-4o-mini", status="blocked", timestamp=NOW,
        ),
    ]  # fmt: skip
    with engine.begin() as conn:
        for record in records:
            insert_usage(conn, record)
    before = rows(engine)

    run = audit_of(engine, recompute_prices(engine, PriceBook(), scope(), actor="ops"))

    assert rows(engine) == before and run.rows_changed == 0


def test_a_recompute_while_calls_are_written_loses_nothing_and_counts_nothing_twice(
    engine: Engine, ledger: list[UsageRecord], tmp_path: Path
) -> None:
    """Writer threads record calls (priced with the old prices) while a recompute with new
    prices walks the same days in small batches; every sum still equals the rows."""
    writer = UsageWriter(engine, UsageSpool(tmp_path / "spool"))
    book, stop = PriceBook(), threading.Event()
    written: list[UsageRecord] = []
    running = threading.Event()
    during = Counter[str]()

    def write(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set() and len(written) < 600:
            record = tracked(book, rng, tasks=("t3", None))  # tasks still running
            assert writer.write(record).persisted
            written.append(record)
            if running.is_set():
                during["rows"] += 1

    threads = [threading.Thread(target=write, args=(seed,)) for seed in (1, 2, 3)]
    for thread in threads:
        thread.start()
    new_prices = PriceBook({"my-llama": LLAMA, "gpt-4o-mini": LLAMA})
    try:
        time.sleep(0.05)
        running.set()
        recompute_prices(engine, new_prices, scope(), actor="ops", batch_rows=20)
        running.clear()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

    assert during["rows"] > 0  # calls really were written while the recompute ran
    assert len(rows(engine)) == len(ledger) + len(written)
    assert_consistent(engine)
    # A last run reprices what the first passed before it was written: then every row is
    # priced as from scratch with the new prices.
    recompute_prices(engine, new_prices, scope(), actor="ops")
    assert_consistent(engine)
    for row in rows(engine):
        if row.status == "success":
            tokens = TokenUsage(row.prompt_tokens, row.completion_tokens, row.cached_tokens)
            quote = new_prices.quote(row.model, tokens, provider=row.provider, at=row.timestamp)
            assert row.cost_pico_usd == usd_to_pico(quote.cost_usd), row.model


def test_two_recomputes_at_once_apply_each_difference_once(
    engine: Engine, ledger: list[UsageRecord]
) -> None:
    """Each batch holds the ledger's writers out, so a second run reads the first one's prices
    (and finds nothing left to change) instead of applying the same difference again."""
    book = PriceBook({"my-llama": LLAMA, "gpt-4o-mini": LLAMA})
    runs: list[str] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            runs.append(recompute_prices(engine, book, scope(), actor="ops", batch_rows=10))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert not errors and len(runs) == 3
    assert_consistent(engine)
    changed = sum(audit_of(engine, run_id).rows_changed for run_id in runs)
    expected = [r for r in ledger if r.model in ("my-llama", "gpt-4o-mini")]
    assert changed == len([r for r in expected if r.status == "success" or r.is_partial])


def test_a_recompute_in_another_process_while_calls_are_written_keeps_every_sum(
    engine: Engine, database_url: str, ledger: list[UsageRecord], tmp_path: Path
) -> None:
    """``asa prices recompute`` in its own process (as an operator runs it beside the service)
    while this process records calls: every sum still equals the rows."""
    writer = UsageWriter(engine, UsageSpool(tmp_path / "spool"))
    book, stop, written = PriceBook(), threading.Event(), Counter[str]()

    def write(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set() and written["rows"] < 3000:
            assert writer.write(tracked(book, rng, tasks=("t3", None))).persisted
            written["rows"] += 1

    threads = [threading.Thread(target=write, args=(seed,)) for seed in (7, 8)]
    for thread in threads:
        thread.start()
    overrides = {"my-llama": {k: str(v) for k, v in LLAMA.items()}}
    env = {
        **os.environ, "DATABASE_URL": database_url, "AUTO_MIGRATE": "false",
        "OPENAI_API_KEY": "", "PRICE_OVERRIDES": json.dumps(overrides),
    }  # fmt: skip
    try:
        before = written["rows"]
        result = subprocess.run(
            [sys.executable, "-m", "app.cli", "prices", "recompute", "--json"],
            cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
            timeout=300, check=False,
        )  # fmt: skip
        during = written["rows"] - before
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["rows_changed"] > 0 and during > 0
    assert len(rows(engine)) == len(ledger) + written["rows"]
    assert_consistent(engine)


def test_a_runtime_that_closes_mid_run_interrupts_it_after_a_batch_and_a_rerun_finishes(
    runtime: Runtime, ledger: list[UsageRecord]
) -> None:
    engine, book = runtime.engine, PriceBook({"my-llama": LLAMA})
    run = runtime.recomputes.start(engine, book, scope(), actor="ops", dry_run=False, batch_rows=1)

    runtime.close()  # as the service's shutdown does

    assert run.done  # the run's thread ended with the runtime, not minutes later
    interrupted = audit_of(engine, run.run_id)
    assert (interrupted.status, interrupted.error) == ("failed", INTERRUPTED)
    assert 0 < interrupted.rows_examined < len(ledger)  # it stopped between batches
    assert_consistent(engine)  # its committed batches are complete
    with pytest.raises(ServiceUnavailable):
        runtime.recomputes.start(engine, book, scope(), actor="ops", dry_run=False)

    rerun = audit_of(engine, recompute_prices(engine, book, scope(), actor="ops"))

    assert rerun.status == "done"
    assert_consistent(engine)
    unpriced = [r for r in rows(engine) if r.model == "my-llama" and r.status == "success"]
    assert unpriced and all(r.cost_status == "priced" for r in unpriced)
