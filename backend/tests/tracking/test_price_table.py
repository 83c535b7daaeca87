"""A local price file (``PRICES_FILE``) and the provenance each tracked call records."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from app.core.config import Settings
from app.core.runtime import Runtime
from app.models import LLMUsage
from app.simulator.server import SimulatorServer
from app.tracking.llm_client import LLMClient
from app.tracking.price_table import PriceFileError, load_price_file, snapshot_source
from app.tracking.pricing import PriceBook, TokenUsage
from tests.conftest import RuntimeFactory

M = Decimal(1_000_000)


def openai_entry(model: str, input_mtok: float, output_mtok: float) -> dict[str, Any]:
    return {"id": model, "match": {"equals": model}, "prices": {"input_mtok": input_mtok,
            "output_mtok": output_mtok}}  # fmt: skip


def write(path: Path, providers: Any) -> Path:
    path.write_text(json.dumps(providers))
    return path


def openai_file(tmp_path: Path, *models: dict[str, Any]) -> Path:
    provider = {"id": "openai", "name": "OpenAI", "api_pattern": r"https://api\.openai\.com"}
    return write(tmp_path / "prices.json", [{**provider, "models": list(models)}])


def test_a_price_file_overrides_a_model_and_keeps_the_rest_of_the_snapshot(
    tmp_path: Path,
) -> None:
    path = openai_file(tmp_path, openai_entry("gpt-4o-mini", 1, 2))
    book = PriceBook(table=load_price_file(path))
    usage = TokenUsage(1000, 500)

    mini = book.quote("gpt-4o-mini", usage)
    other = book.quote("gpt-4o", usage)

    assert mini.cost_usd == (1000 * Decimal(1) + 500 * Decimal(2)) / M
    assert mini.ref is not None and mini.ref.startswith("file:")
    assert (mini.entry, book.table.file and book.table.file.detail) == (
        "openai:gpt-4o-mini",
        str(path.resolve()),
    )
    assert other == PriceBook().quote("gpt-4o", usage)  # from the snapshot, said so
    assert other.ref == snapshot_source().ref


def test_a_price_file_adds_a_provider_the_snapshot_lacks(tmp_path: Path) -> None:
    model = openai_entry("my-llama", 0.5, 1)
    provider = {"id": "self-hosted", "name": "vLLM", "api_pattern": r"https://llm\.internal/"}
    book = PriceBook(table=load_price_file(write(tmp_path / "p.json", [{**provider,
                     "models": [model]}])))  # fmt: skip

    by_setting = book.quote("my-llama", TokenUsage(2000, 100), provider="self-hosted")
    by_endpoint = book.quote("my-llama", TokenUsage(2000, 100), endpoint="https://llm.internal/v1")

    assert by_setting.cost_usd == by_endpoint.cost_usd == (2000 * Decimal("0.5") + 100) / M
    assert book.quote("my-llama", TokenUsage(2000, 100)).status == "unpriced"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"{}", "non-empty JSON list of providers"),
        (b"[]", "non-empty JSON list of providers"),
        (b'[{"id": "x"}]', "not in genai-prices' format"),
        (b'[{"id": "openai", "name": "o", "api_pattern": "x", "models": [{"id": "m"}]}]',
         "not in genai-prices' format"),
        (b'[{"id": "a", "name": "a", "api_pattern": "a"}, {"id": "a", "name": "a",'
         b' "api_pattern": "a"}]', "appears twice"),
    ],
)  # fmt: skip
def test_a_malformed_price_file_is_refused_with_its_path_and_reason(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "prices.json"
    path.write_bytes(content)

    with pytest.raises(PriceFileError) as caught:
        load_price_file(path)

    assert str(caught.value).startswith(f"price file {path}:")
    assert reason in str(caught.value)


def test_a_missing_price_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PriceFileError, match="cannot be read"):
        load_price_file(tmp_path / "nowhere.json")


def test_the_service_does_not_start_on_a_bad_price_file(tmp_path: Path, sqlite_url: str) -> None:
    bad = tmp_path / "prices.json"
    bad.write_text("[1, 2]")
    settings = Settings(
        database_url=sqlite_url, prices_file=bad, spool_dir=tmp_path / "spool",
        auto_migrate=False,
    )  # fmt: skip

    with pytest.raises(PriceFileError, match=str(bad)):
        Runtime.build(settings, start_background=False)


def only_row(runtime: Runtime) -> LLMUsage:
    with runtime.session_factory() as session:
        return session.scalars(select(LLMUsage)).one()


def test_a_tracked_call_records_where_its_price_came_from(
    runtime_factory: RuntimeFactory, sim: SimulatorServer, tmp_path: Path
) -> None:
    path = openai_file(tmp_path, openai_entry("gpt-4o-mini", 1, 2))
    runtime = runtime_factory(prices_file=path)
    client = LLMClient(runtime=runtime)

    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )

    row = only_row(runtime)
    assert reply.usage is not None
    cost = (reply.usage.prompt_tokens * Decimal(1) + reply.usage.completion_tokens * 2) / M
    assert row.cost_usd == cost
    assert row.price_source == runtime.price_book.table.file.ref  # type: ignore[union-attr]
    assert (row.price_entry, row.price_tier, row.service_tier) == (
        "openai:gpt-4o-mini", None, "default",
    )  # fmt: skip


def test_a_call_in_the_flex_tier_is_priced_at_the_flex_price_and_says_so(
    runtime: Runtime, sim: SimulatorServer
) -> None:
    client = LLMClient(runtime=runtime)

    reply = client.chat.completions.create(
        model="gpt-5", messages=[{"role": "user", "content": "hi"}], service_tier="flex"
    )

    row = only_row(runtime)
    assert reply.service_tier == "flex" and row.service_tier == "flex"
    assert reply.usage is not None
    details_in, details_out = (
        reply.usage.prompt_tokens_details,
        reply.usage.completion_tokens_details,
    )
    usage = TokenUsage(
        reply.usage.prompt_tokens,
        reply.usage.completion_tokens,
        details_in.cached_tokens or 0 if details_in else 0,
        details_out.reasoning_tokens or 0 if details_out else 0,
    )
    flex = PriceBook().quote("gpt-5", usage, service_tier="flex")
    assert row.cost_usd == flex.cost_usd < PriceBook().quote("gpt-5", usage).cost_usd
    assert (row.price_entry, row.price_tier) == ("openai:gpt-5", "service_tier=flex")
