"""Revision 0003 fills the overall daily rollup from the per-task rollup already there."""

from __future__ import annotations

from datetime import date

from alembic import command
from sqlalchemy import Engine, inspect, text

from app.core.migrations import alembic_config, upgrade_to_head


def test_upgrade_sums_the_per_task_rollup_by_day_model_and_agent(
    database_url: str, engine: Engine
) -> None:
    command.downgrade(alembic_config(database_url), "0020")
    assert "usage_rollup_daily_overall" not in inspect(engine).get_table_names()
    rows = [
        (date(2026, 1, 1), "alice", "t1", "gpt-4o", "fix", 2, 100, 1.5, 2),
        (date(2026, 1, 1), "bob", "t2", "gpt-4o", "fix", 3, 250, 4.0, 1),
        (date(2026, 1, 1), "bob", "t2", "gpt-4o", "", 1, 7, 0.5, 0),
        (date(2026, 1, 2), "alice", "t3", "gpt-4o", "fix", 1, 1, 9.0, 1),
    ]
    zeros = ", ".join(["0"] * 23)  # the other sums
    with engine.begin() as conn:
        for day, user, task, model, agent, requests, cost, latency, b03 in rows:
            conn.execute(
                text(
                    "INSERT INTO usage_rollup_daily (day, user_id, task_id, model, agent, "
                    "requests, cost_pico_usd, latency_ms_sum, lat_b03, successes, errors, "
                    "blocked, unpriced_calls, prompt_tokens, completion_tokens, cached_tokens, "
                    "reasoning_tokens, total_tokens, lat_b00, lat_b01, lat_b02, lat_b04, "
                    "lat_b05, lat_b06, lat_b07, lat_b08, lat_b09, lat_b10, lat_b11, lat_b12, "
                    f"lat_b13, lat_b14) VALUES (:d, :u, :t, :m, :a, :r, :c, :l, :b, {zeros})"
                ),
                {"d": day, "u": user, "t": task, "m": model, "a": agent, "r": requests,
                 "c": cost, "l": latency, "b": b03},
            )  # fmt: skip

    upgrade_to_head(database_url)

    with engine.connect() as conn:
        overall = conn.execute(
            text(
                "SELECT day, model, agent, requests, cost_pico_usd, latency_ms_sum, lat_b03 "
                "FROM usage_rollup_daily_overall ORDER BY day, agent"
            )
        ).all()
        indexes = {i["name"] for i in inspect(conn).get_indexes("task_metrics")}
    assert [(str(r[0]), *r[1:]) for r in overall] == [
        ("2026-01-01", "gpt-4o", "", 1, 7, 0.5, 0),
        ("2026-01-01", "gpt-4o", "fix", 5, 350, 5.5, 3),
        ("2026-01-02", "gpt-4o", "fix", 1, 1, 9.0, 1),
    ]
    assert "ix_task_metrics_metric_name_timestamp" in indexes
