"""llm usage ledger, daily rollup and task metrics

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "llm_usage",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("task_id", sa.String(length=64), nullable=True),
        sa.Column("user_id", sa.String(length=64), nullable=True),
        sa.Column("agent", sa.String(length=64), nullable=True),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("response_model", sa.String(length=200), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("total_tokens", sa.Integer(), nullable=False),
        sa.Column("cached_tokens", sa.Integer(), nullable=False),
        sa.Column("reasoning_tokens", sa.Integer(), nullable=False),
        sa.Column(
            "cost_pico_usd",
            sa.BigInteger(),
            nullable=False,
            comment="Exact cost in USD x 10^12 (picodollars)",
        ),
        sa.Column("cost_status", sa.String(length=16), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("is_stream", sa.Boolean(), nullable=False),
        sa.Column("is_partial", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("finish_reason", sa.String(length=64), nullable=True),
        sa.Column("error_type", sa.String(length=100), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("flags", sa.String(length=200), nullable=True),
        sa.Column("trace_id", sa.String(length=32), nullable=True),
        sa.Column("span_id", sa.String(length=16), nullable=True),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_llm_usage")),
        sa.UniqueConstraint("request_id", name=op.f("uq_llm_usage_request_id")),
    )
    with op.batch_alter_table("llm_usage", schema=None) as batch_op:
        batch_op.create_index(
            "ix_llm_usage_task_id_timestamp", ["task_id", "timestamp"], unique=False
        )
        batch_op.create_index("ix_llm_usage_timestamp", ["timestamp"], unique=False)
        batch_op.create_index(
            "ix_llm_usage_user_id_timestamp", ["user_id", "timestamp"], unique=False
        )

    op.create_table(
        "task_metrics",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("task_id", sa.String(length=64), nullable=False),
        sa.Column("metric_name", sa.String(length=64), nullable=False),
        sa.Column("metric_value", sa.Numeric(precision=30, scale=12), nullable=False),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_metrics")),
    )
    with op.batch_alter_table("task_metrics", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_task_metrics_task_id"), ["task_id"], unique=False)

    op.create_table(
        "usage_rollup_daily",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("task_id", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("agent", sa.String(length=64), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("successes", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("blocked", sa.BigInteger(), nullable=False),
        sa.Column("unpriced_calls", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False),
        sa.Column("total_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_pico_usd", sa.BigInteger(), nullable=False),
        sa.Column("latency_ms_sum", sa.Float(), nullable=False),
        sa.Column("lat_b00", sa.BigInteger(), nullable=False),
        sa.Column("lat_b01", sa.BigInteger(), nullable=False),
        sa.Column("lat_b02", sa.BigInteger(), nullable=False),
        sa.Column("lat_b03", sa.BigInteger(), nullable=False),
        sa.Column("lat_b04", sa.BigInteger(), nullable=False),
        sa.Column("lat_b05", sa.BigInteger(), nullable=False),
        sa.Column("lat_b06", sa.BigInteger(), nullable=False),
        sa.Column("lat_b07", sa.BigInteger(), nullable=False),
        sa.Column("lat_b08", sa.BigInteger(), nullable=False),
        sa.Column("lat_b09", sa.BigInteger(), nullable=False),
        sa.Column("lat_b10", sa.BigInteger(), nullable=False),
        sa.Column("lat_b11", sa.BigInteger(), nullable=False),
        sa.Column("lat_b12", sa.BigInteger(), nullable=False),
        sa.Column("lat_b13", sa.BigInteger(), nullable=False),
        sa.Column("lat_b14", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_rollup_daily")),
        sa.UniqueConstraint(
            "day", "user_id", "task_id", "model", "agent", name="uq_usage_rollup_key"
        ),
    )
    with op.batch_alter_table("usage_rollup_daily", schema=None) as batch_op:
        batch_op.create_index("ix_usage_rollup_daily_task_id_day", ["task_id", "day"], unique=False)
        batch_op.create_index("ix_usage_rollup_daily_user_id_day", ["user_id", "day"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("usage_rollup_daily", schema=None) as batch_op:
        batch_op.drop_index("ix_usage_rollup_daily_user_id_day")
        batch_op.drop_index("ix_usage_rollup_daily_task_id_day")

    op.drop_table("usage_rollup_daily")
    with op.batch_alter_table("task_metrics", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_task_metrics_task_id"))

    op.drop_table("task_metrics")
    with op.batch_alter_table("llm_usage", schema=None) as batch_op:
        batch_op.drop_index("ix_llm_usage_user_id_timestamp")
        batch_op.drop_index("ix_llm_usage_timestamp")
        batch_op.drop_index("ix_llm_usage_task_id_timestamp")

    op.drop_table("llm_usage")
