"""Revision 0009 adds price provenance to ``llm_usage`` (NULL on older rows), the
``price_source`` and ``price_recompute`` tables; it downgrades cleanly and the ledger's spend
trigger (revision 0005) survives both ways, on both databases."""

from __future__ import annotations

from alembic import command
from sqlalchemy import Engine, inspect, text

from app.core.migrations import alembic_config, upgrade_to_head
from tests.tracking.test_migration_0006_operation import OLD_ROW, _triggers

PROVENANCE = {"price_source", "price_entry", "price_tier", "service_tier"}


def _columns(engine: Engine) -> set[str]:
    return {c["name"] for c in inspect(engine).get_columns("llm_usage")}


def test_older_rows_have_no_provenance_and_the_revision_goes_down_cleanly(
    database_url: str, engine: Engine
) -> None:
    triggers = _triggers(engine)
    command.downgrade(alembic_config(database_url), "0008")
    assert not PROVENANCE & _columns(engine)
    assert not {"price_source", "price_recompute"} & set(inspect(engine).get_table_names())
    assert _triggers(engine) == triggers and triggers
    with engine.begin() as conn:
        conn.execute(text(OLD_ROW))

    upgrade_to_head(database_url)

    assert _columns(engine) >= PROVENANCE
    with engine.connect() as conn:
        found = conn.execute(text("SELECT price_source, price_entry, service_tier FROM llm_usage"))
        assert found.one() == (None, None, None)
    assert _triggers(engine) == triggers
