"""Rows written together (``writer.insert_new_usage``, the tracking thread's batches) leave every
rollup exactly as writing them one by one does, and a batch that holds a row already written
counts nothing twice."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from app.core.prepared import write_gate
from app.models import Base, LLMUsage
from app.tracking.db_worker import DbWorker
from app.tracking.spool import UsageSpool
from app.tracking.writer import (
    ROLLUP_SUM_FIELDS,
    RowsNotNew,
    UsageWriter,
    WriteOutcome,
    insert_new_usage,
    insert_usage,
)
from tests.usage.ledger import random_ledger

ROLLUP_TABLES = sorted(name for name in Base.metadata.tables if name.startswith("usage_rollup"))


def rollup_contents(engine: Engine) -> dict[str, dict[tuple[Any, ...], dict[str, Any]]]:
    """Every rollup table's rows by their key (every column but the id and the sums)."""
    contents: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = {}
    with engine.connect() as conn:
        for name in ROLLUP_TABLES:
            table = Base.metadata.tables[name]
            keys = [c.name for c in table.c if c.name != "id" and c.name not in ROLLUP_SUM_FIELDS]
            rows = {}
            for row in conn.execute(select(table)).mappings():
                rows[tuple(row[k] for k in keys)] = {
                    k: row[k] for k in ROLLUP_SUM_FIELDS if k in row
                }
            contents[name] = rows
    return contents


def clear(engine: Engine) -> None:
    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())


def assert_same_contents(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].keys() == expected[name].keys(), name
        for key, sums in expected[name].items():
            for field, value in sums.items():
                if isinstance(value, float):
                    assert actual[name][key][field] == pytest.approx(value, rel=1e-9)
                else:
                    assert actual[name][key][field] == value, (name, key, field)


def test_a_batch_leaves_every_rollup_as_rows_written_one_by_one(engine: Engine) -> None:
    ledger = random_ledger(400, seed=23)
    # Batches as the tracking thread takes them: mostly calls of a few tasks, some days apart.
    with write_gate(engine).transaction() as tx:
        for record in ledger:
            insert_usage(tx, record)
    one_by_one = rollup_contents(engine)
    assert all(one_by_one[name] for name in ROLLUP_TABLES)  # the ledger reaches every table
    clear(engine)

    for start in range(0, len(ledger), 37):
        with write_gate(engine).transaction() as tx:
            insert_new_usage(tx, ledger[start : start + 37])
    assert_same_contents(rollup_contents(engine), one_by_one)
    with engine.connect() as conn:
        assert len(conn.execute(select(LLMUsage.request_id)).scalars().all()) == len(ledger)


def test_a_batch_holding_a_written_row_is_refused_and_changes_nothing(engine: Engine) -> None:
    ledger = random_ledger(20, seed=5)
    with write_gate(engine).transaction() as tx:
        insert_usage(tx, ledger[3])
    before = rollup_contents(engine)

    with pytest.raises(RowsNotNew), write_gate(engine).transaction() as tx:
        insert_new_usage(tx, ledger)
    assert rollup_contents(engine) == before  # rolled back: nothing of the batch is left


def test_the_worker_writes_a_batch_with_a_replayed_row_one_by_one_counting_it_once(
    engine: Engine, tmp_path: Path
) -> None:
    """A row already in the ledger (say, replayed from the spool) in a batch of new ones: the
    batch falls back to row by row; every row is there once and the rollups count it once."""
    ledger = random_ledger(30, seed=9)
    with write_gate(engine).transaction() as tx:
        insert_usage(tx, ledger[0])
    writer = UsageWriter(engine, UsageSpool(tmp_path / "spool"))
    worker = DbWorker(writer)
    hold = threading.Event()
    worker.call(lambda: hold.wait(10))  # the thread waits while the writes queue up ...
    futures: list[Future[WriteOutcome]] = [worker.write(record, None) for record in ledger]
    hold.set()  # ... then takes them as one batch
    assert all(future.result(timeout=30).persisted for future in futures)
    worker.close()

    written = rollup_contents(engine)
    clear(engine)
    with write_gate(engine).transaction() as tx:
        for record in ledger:
            insert_usage(tx, record)
    assert_same_contents(written, rollup_contents(engine))
    with engine.connect() as conn:
        ids = conn.execute(select(LLMUsage.request_id)).scalars().all()
    assert sorted(ids) == sorted(r.request_id for r in ledger)


def test_calls_of_no_task_in_a_batch_make_no_per_task_total(engine: Engine) -> None:
    ledger = [dataclasses.replace(r, task_id=None) for r in random_ledger(10, seed=2)]
    with write_gate(engine).transaction() as tx:
        insert_new_usage(tx, ledger)
    contents = rollup_contents(engine)
    assert contents["usage_rollup_task_total"] == {}
    assert sum(s["requests"] for s in contents["usage_rollup_daily_overall"].values()) == 10
