"""``/api/v1/admin/prices/recompute`` on a started service with real API keys, and
``asa prices``, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Engine, func, select

from app.access import api_keys
from app.core.db import create_db_engine, transaction
from app.core.migrations import upgrade_to_head
from app.core.runtime import Runtime
from app.main import create_app
from app.models import LLMUsage, PriceRecompute
from app.tracking.record import UsageRecord
from app.tracking.writer import insert_usage

BACKEND = Path(__file__).resolve().parents[2]
OVERRIDES = {"my-llama": {"input_mtok": "0.20", "output_mtok": "0.40"}}
NOW = datetime.now(UTC)


def unpriced_calls(engine: Engine, count: int = 5, provider: str = "openai") -> list[UsageRecord]:
    records = [
        UsageRecord(
            request_id=uuid.uuid4().hex,
            model="my-llama",
            status="success",
            user_id="alice",
            provider=provider,
            prompt_tokens=1000 * (n + 1),
            completion_tokens=100,
            cost_status="unpriced",
            timestamp=NOW - timedelta(minutes=n),
        )
        for n in range(count)
    ]
    with engine.begin() as conn:
        for record in records:
            insert_usage(conn, record)
    return records


def ledger_cost(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.sum(LLMUsage.cost_pico_usd))).scalar() or 0)


class Service:
    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.runtime: Runtime = app.state.runtime

    def client(self, role: api_keys.Role, user: str) -> httpx.AsyncClient:
        with transaction(self.runtime.session_factory) as session:
            issued = api_keys.create_key(session, user_id=user, role=role)
        self.app.state.access.authenticator.note_key_issued()
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app),
            base_url="http://asa.test",
            headers={"Authorization": f"Bearer {issued.key}"},
        )


@pytest.fixture
async def service(
    runtime_factory: Callable[..., Runtime], tmp_path: Path
) -> AsyncIterator[Service]:
    settings = runtime_factory(
        price_overrides=OVERRIDES,
        run_task_worker=False,
        examples_dir=tmp_path / "examples",
        workspace_root=tmp_path / "ws",
    ).settings
    app = create_app(settings)
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    try:
        yield Service(app)
    finally:
        await lifespan.__aexit__(None, None, None)


async def test_an_admin_reprices_with_the_services_prices_and_reads_the_audit(
    service: Service,
) -> None:
    engine = service.runtime.engine
    records = unpriced_calls(engine)
    async with service.client("admin", "root") as admin:
        dry = await admin.post("/api/v1/admin/prices/recompute", json={"dry_run": True})
        assert dry.status_code == 200, dry.text
        assert ledger_cost(engine) == 0
        done = await admin.post(
            "/api/v1/admin/prices/recompute", json={"model": "my-llama", "since": "2000-01-01"}
        )
        listed = await admin.get("/api/v1/admin/prices/recompute")
        one = await admin.get(f"/api/v1/admin/prices/recompute/{done.json()['id']}")

    expected = sum(
        (Decimal(r.prompt_tokens) * Decimal("0.20") + Decimal(r.completion_tokens) * Decimal("0.4"))
        / 1_000_000
        for r in records
    )
    run = done.json()
    assert done.status_code == 200
    assert (run["actor"], run["status"], run["rows_changed"]) == ("root", "done", len(records))
    assert Decimal(run["cost_delta_usd"]) == expected == Decimal(dry.json()["cost_delta_usd"])
    assert (run["unpriced_before"], run["unpriced_after"]) == (len(records), 0)
    assert ledger_cost(engine) == int(expected * 10**12)
    assert [r["id"] for r in listed.json()["items"]] == [run["id"], dry.json()["id"]]
    assert one.json() == run


async def test_a_user_may_neither_run_nor_read_a_recompute(service: Service) -> None:
    engine = service.runtime.engine
    unpriced_calls(engine)
    async with service.client("user", "mallory") as user:
        post = await user.post("/api/v1/admin/prices/recompute", json={})
        listing = await user.get("/api/v1/admin/prices/recompute")

    assert (post.status_code, listing.status_code) == (403, 403)
    assert ledger_cost(engine) == 0
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(PriceRecompute)).scalar() == 0


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"since": "2026-12-01T00:00:00Z", "until": "2026-11-01T00:00:00Z"}, 422),  # reversed
        ({"since": "2026-11-01T00:00:00Z", "until": "2026-11-01T00:00:00Z"}, 422),  # empty
        ({"since": "99999-01-01"}, 422),  # not a date
        ({"until": "0001-01-01T00:00:00+14:00"}, 422),  # before the calendar in UTC
        ({"since": "2026-11-01", "bogus": 1}, 422),  # unknown field
        ({"model": ""}, 422),
        ({"dry_run": "maybe"}, 422),
    ],
)
async def test_absurd_ranges_and_fields_are_refused_and_change_nothing(
    service: Service, body: dict[str, Any], status: int
) -> None:
    engine = service.runtime.engine
    unpriced_calls(engine)
    async with service.client("admin", "root") as admin:
        response = await admin.post("/api/v1/admin/prices/recompute", json=body)

    assert response.status_code == status, response.text
    assert "error" in response.json()
    assert ledger_cost(engine) == 0


async def test_an_unknown_run_is_404(service: Service) -> None:
    async with service.client("admin", "root") as admin:
        response = await admin.get("/api/v1/admin/prices/recompute/abc123")
    assert response.status_code == 404


def json_id(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout.split()[1]  # "run <id> (dry run): done"


def _asa(database_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        **os.environ, "DATABASE_URL": database_url, "AUTO_MIGRATE": "false",
        "OPENAI_API_KEY": "", **env,
    }  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=BACKEND,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_command_reprices_with_a_price_file_and_keeps_an_audit(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    """Rows of a self-hosted provider no price table knew, priced from a local price file."""
    records = unpriced_calls(engine, 3, provider="self-hosted")
    prices = tmp_path / "prices.json"
    model = {"id": "my-llama", "match": {"equals": "my-llama"}}
    provider = {"id": "self-hosted", "name": "Our vLLM", "api_pattern": r"https://llm\.internal/"}
    model["prices"] = {"input_mtok": 0.5, "output_mtok": 1}
    prices.write_text(json.dumps([{**provider, "models": [model]}]))

    dry = _asa(database_url, "prices", "recompute", "--dry-run", PRICES_FILE=str(prices))
    applied = _asa(database_url, "prices", "recompute", "--json", PRICES_FILE=str(prices))
    listing = _asa(database_url, "prices", "runs", "--json")

    assert dry.returncode == 0, dry.stderr
    assert "would change 3" in dry.stdout
    assert applied.returncode == 0, applied.stderr
    run = json.loads(applied.stdout)
    expected = sum(
        (Decimal(r.prompt_tokens) * Decimal("0.5") + Decimal(r.completion_tokens)) / 1_000_000
        for r in records
    )
    file_ref = run["price_sources"][1]
    assert file_ref.startswith("file:") and run["actor"].startswith("cli:")
    assert run["rows_changed"] == 3 and Decimal(run["cost_delta_usd"]) == expected
    assert run["sources_before"] == {"none": 3} and run["sources_after"] == {file_ref: 3}
    assert [r["id"] for r in json.loads(listing.stdout)][:2] == [run["id"], json_id(dry)]
    assert ledger_cost(engine) == expected * 10**12


def test_the_command_names_a_bad_price_file_and_changes_nothing(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    unpriced_calls(engine, 2)
    bad = tmp_path / "prices.json"
    bad.write_text('[{"id": "x"}]')

    result = _asa(database_url, "prices", "recompute", PRICES_FILE=str(bad))

    assert result.returncode == 2
    assert f"price file {bad}" in result.stderr and "Traceback" not in result.stderr
    assert ledger_cost(engine) == 0


def test_every_command_of_the_prices_doc_runs(tmp_path: Path) -> None:
    """docs/PRICES.md's commands, as written, against a fresh database (migrated by the
    command itself) with one unpriced call of ``my-llama`` priced by an override."""
    doc = (BACKEND.parent / "docs" / "PRICES.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", doc, re.DOTALL)
    assert blocks
    url = f"sqlite:///{tmp_path / 'doc.db'}"
    upgrade_to_head(url)
    engine = create_db_engine(url)
    try:
        unpriced_calls(engine, 2)
        env = {
            **os.environ, "DATABASE_URL": url, "OPENAI_API_KEY": "",
            "PRICE_OVERRIDES": json.dumps(OVERRIDES),
        }  # fmt: skip
        for block in blocks:  # each block in one shell, as a reader pastes it
            result = subprocess.run(
                ["bash", "-ec", block], cwd=BACKEND.parent, env=env, capture_output=True,
                text=True, timeout=300, check=False,
            )  # fmt: skip
            assert result.returncode == 0, (block, result.stderr)
        assert ledger_cost(engine) > 0  # the second command priced the calls
    finally:
        engine.dispose()
