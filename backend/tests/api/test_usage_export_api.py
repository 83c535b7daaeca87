"""``GET /api/v1/usage/export`` over HTTP (ASGI), on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Engine

from app.access.principal import Principal
from app.tracking.record import UsageRecord
from app.tracking.writer import insert_usage

ADMIN = Principal("root", "admin")


def usage(**fields: Any) -> UsageRecord:
    fields.setdefault("request_id", uuid.uuid4().hex)
    fields.setdefault("status", "success")
    fields.setdefault("model", "gpt-4o-mini")
    return UsageRecord(**fields)


ROWS = [
    usage(request_id="r1", task_id="t1", user_id="alice", agent="fix_agent",
          prompt_tokens=10, completion_tokens=2, cost_pico_usd=1_500_000,
          timestamp=datetime(2026, 3, 1, 23, 59, 59, tzinfo=UTC)),
    usage(request_id="r2", task_id="t1", user_id="alice", status="error",
          error_message="=cmd|' /C calc'!A0", timestamp=datetime(2026, 3, 2, tzinfo=UTC)),
    usage(request_id="r3", task_id="t2", user_id="bob", cost_pico_usd=10**12,
          timestamp=datetime(2026, 3, 2, 12, tzinfo=UTC)),
    usage(request_id="r4", user_id="alice", cost_pico_usd=100_000,
          timestamp=datetime(2026, 3, 3, tzinfo=UTC)),
]  # fmt: skip


@pytest.fixture
def ledger(engine: Engine) -> None:
    with engine.begin() as conn:
        for record in ROWS:
            insert_usage(conn, record)


@pytest.fixture
def app(report_app: FastAPI) -> FastAPI:
    return report_app


def parse_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


async def test_task_export_as_csv_in_time_order(client: httpx.AsyncClient, ledger: None) -> None:
    response = await client.get("/api/v1/usage/export", params={"task_id": "t1"})

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    assert 'filename="usage-task-t1.csv"' in response.headers["content-disposition"]
    rows = parse_csv(response.text)
    assert [r["request_id"] for r in rows] == ["r1", "r2"]
    assert rows[0]["cost_usd"] == "0.0000015"
    assert rows[0]["cost_pico_usd"] == "1500000"
    assert rows[0]["timestamp"] == "2026-03-01T23:59:59+00:00"
    assert rows[0]["agent"] == "fix_agent"


async def test_csv_neutralises_spreadsheet_formulas(
    client: httpx.AsyncClient, ledger: None
) -> None:
    response = await client.get("/api/v1/usage/export?task_id=t1")

    assert parse_csv(response.text)[1]["error_message"] == "'=cmd|' /C calc'!A0"


async def test_user_export_as_json_keeps_exact_values(
    client: httpx.AsyncClient, ledger: None
) -> None:
    response = await client.get("/api/v1/usage/export?format=json&user_id=alice")

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    rows = response.json()
    assert [r["request_id"] for r in rows] == ["r1", "r2", "r4"]
    assert rows[1]["error_message"] == "=cmd|' /C calc'!A0"
    assert rows[2]["cost_usd"] == "0.0000001"
    assert rows[2]["cost_pico_usd"] == 100_000


async def test_time_range_is_since_inclusive_until_exclusive(
    client: httpx.AsyncClient, ledger: None
) -> None:
    response = await client.get(
        "/api/v1/usage/export",
        params={"format": "json", "since": "2026-03-02T00:00:00Z", "until": "2026-03-03T00:00:00"},
    )

    assert [r["request_id"] for r in response.json()] == ["r2", "r3"]


async def test_empty_export_is_a_valid_document(client: httpx.AsyncClient, ledger: None) -> None:
    as_json = await client.get("/api/v1/usage/export?format=json&user_id=nobody")
    as_csv = await client.get("/api/v1/usage/export?user_id=nobody")

    assert as_json.json() == []
    assert as_csv.text.splitlines()[0].startswith("id,request_id,")
    assert len(as_csv.text.splitlines()) == 1


async def test_users_export_their_own_rows_only(
    client: httpx.AsyncClient, ledger: None, act_as: Callable[[str], None]
) -> None:
    act_as("bob")

    assert (await client.get("/api/v1/usage/export?user_id=bob")).status_code == 200
    assert (await client.get("/api/v1/usage/export?task_id=t2")).status_code == 200
    assert (await client.get("/api/v1/usage/export?user_id=alice")).status_code == 403
    assert (await client.get("/api/v1/usage/export?task_id=t1")).status_code == 404  # as absent
    assert (await client.get("/api/v1/usage/export")).status_code == 403


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("format=xml", 422),
        ("task_id=" + "x" * 65, 422),
        ("user_id=a%20b", 422),
        ("since=yesterday", 422),
        ("since=2026-03-02T00:00:00Z&until=2026-03-02T00:00:00Z", 422),
        ("until=9999-12-31T23:59:59-14:00", 422),
        ("task_id=unknown", 404),
    ],
)
async def test_bad_export_requests_are_refused_before_streaming(
    client: httpx.AsyncClient, ledger: None, query: str, status: int
) -> None:
    response = await client.get(f"/api/v1/usage/export?{query}")

    assert response.status_code == status, response.text
    assert response.json()["error"] in {"invalid_input", "not_found"}
