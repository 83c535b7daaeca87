"""usage read paths: the overall daily rollup, and task_metrics by name and time

Revision ID: 0003
Revises: 0020
Create Date: 2026-11-27

Written by hand. Revision ids are labels; this one follows 0020, the head when it was written.

``usage_rollup_daily_overall`` is ``usage_rollup_daily`` summed over users and tasks, so the
overall report reads ~20 rows a day instead of one per task; the upgrade fills it from the
per-task rollup, and from then on the usage writer increments both in one transaction. (A
process still running the previous code while this runs would write rows that miss the new
table: upgrade with the writers stopped, as ``auto_migrate`` at start-up does.)

``ix_task_metrics_metric_name_timestamp`` serves the task metrics report's
``metric_name = ? AND timestamp >= ? AND timestamp < ?``; ``metric_value`` is in it so that
PostgreSQL reads the percentiles from the index alone.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SUMS = (
    "requests", "successes", "errors", "blocked", "unpriced_calls", "prompt_tokens",
    "completion_tokens", "cached_tokens", "reasoning_tokens", "total_tokens", "cost_pico_usd",
    "latency_ms_sum", *(f"lat_b{i:02d}" for i in range(15)),
)  # fmt: skip


def upgrade() -> None:
    op.create_table(
        "usage_rollup_daily_overall",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("agent", sa.String(length=64), nullable=False),
        *(
            sa.Column(name, sa.Float() if name == "latency_ms_sum" else sa.BigInteger(),
                      nullable=False)
            for name in SUMS
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_rollup_daily_overall")),
        sa.UniqueConstraint("day", "model", "agent", name="uq_usage_rollup_daily_overall_key"),
    )  # fmt: skip
    columns = ", ".join(SUMS)
    sums = ", ".join(f"SUM({name})" for name in SUMS)
    # The column names are this module's constants, not input.
    op.execute(
        f"INSERT INTO usage_rollup_daily_overall (day, model, agent, {columns}) "  # noqa: S608
        f"SELECT day, model, agent, {sums} FROM usage_rollup_daily GROUP BY day, model, agent"
    )
    with op.batch_alter_table("task_metrics", schema=None) as batch_op:
        batch_op.create_index(
            "ix_task_metrics_metric_name_timestamp",
            ["metric_name", "timestamp", "metric_value"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("task_metrics", schema=None) as batch_op:
        batch_op.drop_index("ix_task_metrics_metric_name_timestamp")

    op.drop_table("usage_rollup_daily_overall")
