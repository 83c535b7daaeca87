"""task metrics: a task's metric recorded once, and the daily task rollup

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28

Written by hand.

``task_metrics`` gets a unique ``(task_id, metric_name)``: a task's metrics are recorded once,
the first write wins. Rows that already repeat a (task, metric) pair are deleted first, keeping
the earliest (ties: the smallest id), which is the row the rule would have kept.

``task_metrics_daily`` sums finished tasks per UTC day (counts by outcome, cost in picodollars,
a duration histogram with sum and maximum); the upgrade fills it from ``task_metrics`` and from
then on the orchestrator's write increments it in the same transaction (upgrade with the
workers stopped, as ``auto_migrate`` at start-up does). The bucket bounds are
``app.models.DURATION_BUCKETS_SECONDS`` as of this revision, copied here so that the
revision does not change if they do.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DURATION_BUCKETS_SECONDS = (
    1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 240, 300, 450, 600, 900, 1200, 1800, 2700, 3600,
    7200, 14400, 43200,
)  # fmt: skip
BUCKETS = [f"dur_b{i:02d}" for i in range(len(DURATION_BUCKETS_SECONDS) + 1)]
STATUSES = ("succeeded", "failed", "budget_exceeded", "cancelled", "error")
COUNTS = (
    "tasks", "succeeded", *(f"status_{s}" for s in STATUSES), "cost_tasks", "cost_pico_usd",
    "duration_count",
)  # fmt: skip


def _delete_repeated_metrics() -> None:
    op.execute(
        "DELETE FROM task_metrics WHERE id IN ("
        " SELECT id FROM ("
        "  SELECT id, ROW_NUMBER() OVER ("
        "   PARTITION BY task_id, metric_name ORDER BY timestamp, id) AS n"
        "  FROM task_metrics) AS ranked"
        " WHERE n > 1)"
    )


def _fill_task_metrics_daily(dialect: str) -> None:
    if dialect == "postgresql":
        day = "(timezone('UTC', timestamp))::date"
        pico = "CAST(ROUND(metric_value * 1000000000000) AS BIGINT)"
        seconds = "CAST(metric_value AS DOUBLE PRECISION)"
    else:  # SQLite keeps UTC text and NUMERIC as a double: round each cost to the picodollar
        day = "date(timestamp)"
        pico = "CAST(ROUND(metric_value * 1000000000000) AS INTEGER)"
        seconds = "CAST(metric_value AS REAL)"
    whens = " ".join(
        f"WHEN metric_value <= {bound} THEN {i}" for i, bound in enumerate(DURATION_BUCKETS_SECONDS)
    )
    bucket = f"CASE {whens} ELSE {len(DURATION_BUCKETS_SECONDS)} END"

    def count(name: str, condition: str = "1 = 1") -> str:
        return f"SUM(CASE WHEN metric_name = '{name}' AND {condition} THEN 1 ELSE 0 END)"

    sums = {
        "tasks": count("succeeded"),
        "succeeded": count("succeeded", "metric_value = 1"),
        **{f"status_{s}": count(f"status.{s}", "metric_value = 1") for s in STATUSES},
        "cost_tasks": count("cost_usd"),
        "cost_pico_usd": f"SUM(CASE WHEN metric_name = 'cost_usd' THEN {pico} ELSE 0 END)",
        "duration_count": count("duration_seconds"),
        "duration_sum": (
            f"COALESCE(SUM(CASE WHEN metric_name = 'duration_seconds' THEN {seconds} END), 0)"
        ),
        "duration_max": (
            f"COALESCE(MAX(CASE WHEN metric_name = 'duration_seconds' THEN {seconds} END), 0)"
        ),
        **{name: count("duration_seconds", f"{bucket} = {i}") for i, name in enumerate(BUCKETS)},
    }
    names = ["succeeded", *(f"status.{s}" for s in STATUSES), "cost_usd", "duration_seconds"]
    listed = ", ".join(f"'{n}'" for n in names)
    # Every name and expression above is this module's constant, not input.
    op.execute(
        f"INSERT INTO task_metrics_daily (day, {', '.join(sums)}) "  # noqa: S608
        f"SELECT {day}, {', '.join(sums.values())} FROM task_metrics "
        f"WHERE metric_name IN ({listed}) GROUP BY {day}"
    )


def upgrade() -> None:
    _delete_repeated_metrics()
    with op.batch_alter_table("task_metrics", schema=None) as batch_op:
        batch_op.create_unique_constraint(
            "uq_task_metrics_task_id_metric_name", ["task_id", "metric_name"]
        )
    op.create_table(
        "task_metrics_daily",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        *(sa.Column(name, sa.BigInteger(), nullable=False) for name in COUNTS),
        sa.Column("duration_sum", sa.Float(), nullable=False),
        sa.Column("duration_max", sa.Float(), nullable=False),
        *(sa.Column(name, sa.BigInteger(), nullable=False) for name in BUCKETS),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_metrics_daily")),
        sa.UniqueConstraint("day", name="uq_task_metrics_daily_day"),
    )
    _fill_task_metrics_daily(op.get_bind().dialect.name)


def downgrade() -> None:
    op.drop_table("task_metrics_daily")
    with op.batch_alter_table("task_metrics", schema=None) as batch_op:
        batch_op.drop_constraint("uq_task_metrics_task_id_metric_name", type_="unique")
