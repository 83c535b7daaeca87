"""usage rollups: a per-task total (cost, calls, first and last UTC day), ranked by cost

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-30

Written by hand. ``usage_rollup_task_total`` holds one row per task (calls of no task are not
counted): its calls and cost over all time, the first and last UTC day it had calls, and the
user of its calls (the greatest user id, as the overview names a task's owner). The web
overview's "top tasks" scans it in descending cost and stops after a few rows (a task's cost in
a window is at most its total) instead of summing the ~450k per-task cells of
``usage_rollup_daily`` a month of a busy service holds.

It is filled from ``usage_rollup_daily`` rather than ``llm_usage``: the daily rollup also holds
calls whose rows retention has pruned, and the usage writer moves both in the same transaction
(``app.tracking.writer.apply_to_rollups``), so from now on the two agree. Upgrade with the
writers stopped, as ``auto_migrate`` does at start-up.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "usage_rollup_task_total"

FILL_SQL = (
    f"INSERT INTO {TABLE} (task_id, user_id, first_day, last_day, requests, cost_pico_usd) "  # noqa: S608
    "SELECT task_id, MAX(user_id), MIN(day), MAX(day), SUM(requests), SUM(cost_pico_usd) "
    "FROM usage_rollup_daily WHERE task_id <> '' GROUP BY task_id"
)


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("task_id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("first_day", sa.Date(), nullable=False),
        sa.Column("last_day", sa.Date(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("cost_pico_usd", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{TABLE}")),
        sa.UniqueConstraint("task_id", name=f"uq_{TABLE}_task_id"),
    )
    op.execute(FILL_SQL)
    # Made after the fill: one sort instead of an index update per row.
    op.create_index(f"ix_{TABLE}_cost_pico_usd", TABLE, ["cost_pico_usd"], unique=False)


def downgrade() -> None:
    op.drop_index(f"ix_{TABLE}_cost_pico_usd", table_name=TABLE)
    op.drop_table(TABLE)
