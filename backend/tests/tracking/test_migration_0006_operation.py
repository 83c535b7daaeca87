"""Revision 0006 adds ``llm_usage.operation``: rows written before it are chat completions, and
the ledger's spend trigger (revision 0005) survives it on both databases."""

from __future__ import annotations

from alembic import command
from sqlalchemy import Engine, inspect, text

from app.core.migrations import alembic_config, upgrade_to_head

OLD_ROW = (
    "INSERT INTO llm_usage (id, request_id, provider, model, prompt_tokens, completion_tokens, "
    "total_tokens, cached_tokens, reasoning_tokens, cost_pico_usd, cost_status, latency_ms, "
    "status, is_stream, is_partial, attempts, timestamp) VALUES ('r1', 'req-1', 'openai', "
    "'gpt-4o', 1, 1, 2, 0, 0, 5, 'priced', 1.0, 'success', false, false, 1, "
    "'2026-01-01 00:00:00+00:00')"
)


def _triggers(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            query = "SELECT name FROM sqlite_master WHERE type = 'trigger'"
        else:
            query = "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal"
        return set(conn.execute(text(query)).scalars())


def test_rows_before_the_revision_are_chat_and_the_trigger_stays(
    database_url: str, engine: Engine
) -> None:
    triggers = _triggers(engine)
    command.downgrade(alembic_config(database_url), "0005")
    assert "operation" not in {c["name"] for c in inspect(engine).get_columns("llm_usage")}
    with engine.begin() as conn:
        conn.execute(text(OLD_ROW))

    upgrade_to_head(database_url)

    with engine.connect() as conn:
        operation = conn.execute(text("SELECT operation FROM llm_usage")).scalar_one()
    assert operation == "chat"
    assert _triggers(engine) == triggers and triggers
