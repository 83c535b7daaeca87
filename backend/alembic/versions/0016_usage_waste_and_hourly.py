"""usage rollups: waste sums (errors', truncated and retried calls' spend) and an hourly spend

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-30

Written by hand. Every usage rollup (``usage_rollup_daily``, ``usage_rollup_user_daily``,
``usage_rollup_daily_overall``) gains the waste sums the recommendations report reads instead of
scanning ``llm_usage``: the spend of failed calls (``status = 'error'``; their count is
``errors``), the count and spend of answers cut at max_tokens (``finish_reason = 'length'``),
and the count, extra attempts (``attempts - 1``) and spend of calls the SDK retried
(``attempts > 1``). The columns default to 0 in the database too, so a writer of the previous
revision still inserts rollup rows during a rolling upgrade. They are filled from ``llm_usage``
with one grouped scan per table, of the rows that count in any of them; calls whose rows
retention had already pruned are counted in the rollups' other sums but not in these (no
source is left to tell).

``usage_rollup_hourly`` (per user, UTC hour and model: calls and cost) is new: the anomaly scan
reads it instead of grouping a week of ``llm_usage`` by hour. It is filled from ``llm_usage``.
Upgrade with the writers stopped, as ``auto_migrate`` does at start-up.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WASTE = (
    "error_cost_pico_usd", "truncated_calls", "truncated_cost_pico_usd", "retried_calls",
    "retry_attempts", "retried_cost_pico_usd",
)  # fmt: skip
KEYS = {
    "usage_rollup_daily": ("day", "user_id", "task_id", "model", "agent", "provider", "operation"),
    "usage_rollup_user_daily": ("user_id", "day", "model", "provider", "operation"),
    "usage_rollup_daily_overall": ("day", "model", "agent", "provider", "operation"),
}
HOURLY = "usage_rollup_hourly"


def _expressions(dialect: str) -> dict[str, str]:
    pg = dialect == "postgresql"
    return {
        "day": "(timezone('UTC', timestamp))::date" if pg else "date(timestamp)",
        "user_id": "COALESCE(user_id, '')",
        "task_id": "COALESCE(task_id, '')",
        "model": "model",
        "agent": "COALESCE(agent, '')",
        "provider": "provider",
        "operation": "operation",
        # The start of the UTC hour, as each dialect stores a timezone-aware DateTime.
        "hour": (
            "timezone('UTC', date_trunc('hour', timezone('UTC', timestamp)))"
            if pg
            else "strftime('%Y-%m-%d %H:00:00.000000', timestamp)"
        ),
    }


def fill_waste_sql(dialect: str, table: str) -> str:
    """``UPDATE ... FROM`` of ``table``'s waste sums, grouped from the ``llm_usage`` rows that
    count in any of them (the sums ``app.tracking.writer.rollup_values`` adds row by row).
    Every name in it is this module's constant."""
    keys = KEYS[table]
    exprs = _expressions(dialect)
    sums = {
        "error_cost_pico_usd": "SUM(CASE WHEN status = 'error' THEN cost_pico_usd ELSE 0 END)",
        "truncated_calls": "SUM(CASE WHEN finish_reason = 'length' THEN 1 ELSE 0 END)",
        "truncated_cost_pico_usd": (
            "SUM(CASE WHEN finish_reason = 'length' THEN cost_pico_usd ELSE 0 END)"
        ),
        "retried_calls": "SUM(CASE WHEN attempts > 1 THEN 1 ELSE 0 END)",
        "retry_attempts": "SUM(CASE WHEN attempts > 1 THEN attempts - 1 ELSE 0 END)",
        "retried_cost_pico_usd": "SUM(CASE WHEN attempts > 1 THEN cost_pico_usd ELSE 0 END)",
    }
    grouped = (
        f"SELECT {', '.join(f'{exprs[k]} AS {k}' for k in keys)}, "  # noqa: S608
        f"{', '.join(f'{sums[w]} AS {w}' for w in WASTE)} FROM llm_usage "
        "WHERE (status = 'error' AND cost_pico_usd <> 0) OR finish_reason = 'length' "
        f"OR attempts > 1 GROUP BY {', '.join(str(i + 1) for i in range(len(keys)))}"
    )
    return (
        f"UPDATE {table} SET {', '.join(f'{w} = w.{w}' for w in WASTE)} "  # noqa: S608
        f"FROM ({grouped}) AS w WHERE {' AND '.join(f'{table}.{k} = w.{k}' for k in keys)}"
    )


def fill_hourly_sql(dialect: str) -> str:
    """``INSERT ... SELECT`` of the hourly spend from ``llm_usage``."""
    exprs = _expressions(dialect)
    return (
        f"INSERT INTO {HOURLY} (user_id, hour, model, requests, cost_pico_usd) "  # noqa: S608
        f"SELECT {exprs['user_id']}, {exprs['hour']}, model, COUNT(*), SUM(cost_pico_usd) "
        "FROM llm_usage GROUP BY 1, 2, 3"
    )


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    for table in KEYS:
        for name in WASTE:
            # A constant default: PostgreSQL adds the column without rewriting the table.
            op.add_column(
                table, sa.Column(name, sa.BigInteger(), server_default="0", nullable=False)
            )
        op.execute(fill_waste_sql(dialect, table))
    op.create_table(
        HOURLY,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("cost_pico_usd", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{HOURLY}")),
        sa.UniqueConstraint("user_id", "hour", "model", name=f"uq_{HOURLY}_key"),
    )
    op.execute(fill_hourly_sql(dialect))
    # Made after the fill: one sort instead of an index update per row.
    op.create_index(f"ix_{HOURLY}_hour", HOURLY, ["hour"], unique=False)


def downgrade() -> None:
    op.drop_index(f"ix_{HOURLY}_hour", table_name=HOURLY)
    op.drop_table(HOURLY)
    for table in KEYS:
        for name in reversed(WASTE):
            op.drop_column(table, name)
