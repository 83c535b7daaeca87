"""usage rollups: keyed by provider and operation, and a per-user daily rollup

Revision ID: 0008
Revises: 0011
Create Date: 2026-12-04

Written by hand. Revision ids are labels; this one follows 0011, the head when it was written.

``usage_rollup_daily`` (per task) and ``usage_rollup_daily_overall`` gain ``provider`` and
``operation`` in their keys, so the usage reports can break spend down by them, and
``usage_rollup_user_daily`` (per user, UTC day, model, provider and operation) is new: the user
report and everyone's spend by user read it instead of a row per task.

The three are rebuilt from ``llm_usage`` with the sums the usage writer keeps row by row (the
latency histogram taken as cumulative counts, one comparison per bound and row, and differenced
per group). What the old rollups held beyond the rows still in ``llm_usage`` (calls whose rows
retention has pruned) is kept, under provider and operation '' (unknown), so every report's
totals stay what they were. Upgrade with the writers stopped, as ``auto_migrate`` does at
start-up. The latency bounds are ``app.models.LATENCY_BUCKETS_MS`` as of this revision, copied
so that the revision does not change if they do. ``bench/seed_usage.py`` fills the rollups of
its synthetic ledger through this revision.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LATENCY_BUCKETS_MS = (
    5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000,
)  # fmt: skip
BUCKETS = tuple(f"lat_b{i:02d}" for i in range(len(LATENCY_BUCKETS_MS) + 1))
SUMS = (
    "requests", "successes", "errors", "blocked", "unpriced_calls", "prompt_tokens",
    "completion_tokens", "cached_tokens", "reasoning_tokens", "total_tokens", "cost_pico_usd",
    "latency_ms_sum", *BUCKETS,
)  # fmt: skip

TASK = "usage_rollup_daily"
OVERALL = "usage_rollup_daily_overall"
USER = "usage_rollup_user_daily"
OLD_KEYS = {
    TASK: ("day", "user_id", "task_id", "model", "agent"),
    OVERALL: ("day", "model", "agent"),
}
NEW_KEYS = {
    TASK: (*OLD_KEYS[TASK], "provider", "operation"),
    OVERALL: (*OLD_KEYS[OVERALL], "provider", "operation"),
    USER: ("user_id", "day", "model", "provider", "operation"),
}
UNIQUE = {
    TASK: "uq_usage_rollup_key",
    OVERALL: "uq_usage_rollup_daily_overall_key",
    USER: "uq_usage_rollup_user_daily_key",
}
# Where each table's old content is kept while it is rebuilt, and the columns it is matched on
# (the user rollup's come from the per-task one).
KEPT = {TASK: "rollup_0008_task", OVERALL: "rollup_0008_overall", USER: "rollup_0008_task"}
MATCH = {TASK: OLD_KEYS[TASK], OVERALL: OLD_KEYS[OVERALL], USER: ("user_id", "day", "model")}


def fill_from_usage_sql(dialect: str, table: str) -> str:
    """``INSERT ... SELECT`` of ``table``'s rows from ``llm_usage``: the sums the usage writer
    adds row by row, per key of the table. Every name in it is this module's constant."""
    day = "(timezone('UTC', timestamp))::date" if dialect == "postgresql" else "date(timestamp)"
    expressions = {
        "day": day,
        "user_id": "COALESCE(user_id, '')",
        "task_id": "COALESCE(task_id, '')",
        "model": "model",
        "agent": "COALESCE(agent, '')",
        "provider": "provider",
        "operation": "operation",
    }
    keys = NEW_KEYS[table]
    bounds = len(LATENCY_BUCKETS_MS)
    at_most = ", ".join(
        f"SUM(CASE WHEN latency_ms <= {b} THEN 1 ELSE 0 END) AS le{i:02d}"
        for i, b in enumerate(LATENCY_BUCKETS_MS)
    )
    counts = ["le00", *(f"le{i:02d} - le{i - 1:02d}" for i in range(1, bounds))]
    counts.append(f"requests - le{bounds - 1:02d}")
    plain = SUMS[: -len(BUCKETS)]
    return (
        f"INSERT INTO {table} ({', '.join(keys)}, {', '.join(SUMS)}) "  # noqa: S608
        f"SELECT {', '.join(keys)}, {', '.join(plain)}, {', '.join(counts)} FROM ("
        f" SELECT {', '.join(f'{expressions[k]} AS {k}' for k in keys)},"
        "  COUNT(*) AS requests,"
        "  SUM(CASE WHEN status = 'success' THEN 1 ELSE 0 END) AS successes,"
        "  SUM(CASE WHEN status = 'error' THEN 1 ELSE 0 END) AS errors,"
        "  SUM(CASE WHEN status = 'blocked' THEN 1 ELSE 0 END) AS blocked,"
        "  SUM(CASE WHEN cost_status = 'unpriced' AND status <> 'blocked' THEN 1 ELSE 0 END)"
        "   AS unpriced_calls,"
        "  SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens,"
        "  SUM(cached_tokens) AS cached_tokens, SUM(reasoning_tokens) AS reasoning_tokens,"
        "  SUM(total_tokens) AS total_tokens, SUM(cost_pico_usd) AS cost_pico_usd,"
        f"  SUM(latency_ms) AS latency_ms_sum, {at_most}"
        f" FROM llm_usage GROUP BY {', '.join(str(i + 1) for i in range(len(keys)))}"
        ") AS grouped"
    )


def _summed(source: str, match: Sequence[str]) -> str:
    sums = ", ".join(f"SUM({name}) AS {name}" for name in SUMS)
    return f"SELECT {', '.join(match)}, {sums} FROM {source} GROUP BY {', '.join(match)}"  # noqa: S608


def _keep_pruned_sql(table: str) -> str:
    """What the old rollup counted beyond the rebuilt rows (calls pruned from ``llm_usage``),
    as rows of provider and operation ''."""
    match = MATCH[table]
    keys = [f"o.{k}" if k in match else "''" for k in NEW_KEYS[table]]
    joined = " AND ".join(f"o.{k} = n.{k}" for k in match)
    rest = ", ".join(f"o.{s} - COALESCE(n.{s}, 0)" for s in SUMS)
    return (
        f"INSERT INTO {table} ({', '.join(NEW_KEYS[table])}, {', '.join(SUMS)}) "  # noqa: S608
        f"SELECT {', '.join(keys)}, {rest} "
        f"FROM ({_summed(KEPT[table], match)}) AS o "
        f"LEFT JOIN ({_summed(table, match)}) AS n ON {joined} "
        "WHERE o.requests > COALESCE(n.requests, 0)"
    )


def _sum_columns() -> list[sa.Column[float]]:
    return [
        sa.Column(name, sa.Float() if name == "latency_ms_sum" else sa.BigInteger(),
                  nullable=False)
        for name in SUMS
    ]  # fmt: skip


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    for table in (TASK, OVERALL):
        op.execute(f"CREATE TABLE {KEPT[table]} AS SELECT * FROM {table}")  # noqa: S608
        op.execute(f"DELETE FROM {table}")  # noqa: S608
        # Emptied first: the new NOT NULL columns need no default (the models have none).
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("provider", sa.String(length=64), nullable=False))
            batch_op.add_column(sa.Column("operation", sa.String(length=16), nullable=False))
            batch_op.drop_constraint(UNIQUE[table], type_="unique")
            batch_op.create_unique_constraint(UNIQUE[table], list(NEW_KEYS[table]))
    op.create_table(
        USER,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("operation", sa.String(length=16), nullable=False),
        *_sum_columns(),
        sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{USER}")),
        sa.UniqueConstraint(*NEW_KEYS[USER], name=UNIQUE[USER]),
    )
    with op.batch_alter_table(USER, schema=None) as batch_op:
        batch_op.create_index("ix_usage_rollup_user_daily_day", ["day"], unique=False)
    for table in (TASK, USER, OVERALL):
        op.execute(fill_from_usage_sql(dialect, table))
        op.execute(_keep_pruned_sql(table))
    for kept in (KEPT[TASK], KEPT[OVERALL]):
        op.drop_table(kept)


def downgrade() -> None:
    op.drop_table(USER)
    for table in (TASK, OVERALL):
        op.execute(f"CREATE TABLE {KEPT[table]} AS SELECT * FROM {table}")  # noqa: S608
        op.execute(f"DELETE FROM {table}")  # noqa: S608
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_constraint(UNIQUE[table], type_="unique")
            batch_op.drop_column("operation")
            batch_op.drop_column("provider")
            batch_op.create_unique_constraint(UNIQUE[table], list(OLD_KEYS[table]))
        keys = ", ".join(OLD_KEYS[table])
        op.execute(
            f"INSERT INTO {table} ({keys}, {', '.join(SUMS)}) "  # noqa: S608
            f"SELECT {keys}, {', '.join(f'SUM({s})' for s in SUMS)} FROM {KEPT[table]} "
            f"GROUP BY {keys}"
        )
        op.drop_table(KEPT[table])
