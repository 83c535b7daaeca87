"""The export is produced lazily, a batch at a time, as a valid CSV or JSON document."""

from __future__ import annotations

import csv
import io
import json
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine

from app.tracking.record import UsageRecord
from app.tracking.writer import insert_usage
from app.usage.export import ExportFilter, export_usage

START = datetime(2026, 1, 1, tzinfo=UTC)


def seed(engine: Engine, count: int) -> None:
    with engine.begin() as conn:
        for i in range(count):
            insert_usage(
                conn,
                UsageRecord(
                    request_id=f"r{i:03d}-{uuid.uuid4().hex[:6]}",
                    model="gpt-4o-mini",
                    status="success",
                    user_id="alice",
                    timestamp=START + timedelta(minutes=i),
                ),
            )


def test_json_export_streams_in_chunks_of_one_batch(engine: Engine) -> None:
    seed(engine, 7)

    chunks = list(export_usage(engine, ExportFilter(user_id="alice"), "json", batch_size=3))

    assert len(chunks) >= 3
    rows = json.loads("".join(chunks))
    assert [r["timestamp"] for r in rows] == [
        (START + timedelta(minutes=i)).isoformat() for i in range(7)
    ]


def test_csv_export_streams_in_chunks_of_one_batch(engine: Engine) -> None:
    seed(engine, 7)

    chunks = list(export_usage(engine, ExportFilter(), "csv", batch_size=2))

    assert len(chunks) >= 4
    rows = list(csv.DictReader(io.StringIO("".join(chunks))))
    assert len(rows) == 7
    assert rows[0]["request_id"].startswith("r000")


def test_nothing_is_queried_until_the_stream_is_read(engine: Engine) -> None:
    stream = export_usage(engine, ExportFilter(), "json")
    seed(engine, 2)  # rows written after the call, before reading, are in the export

    assert len(json.loads("".join(stream))) == 2
