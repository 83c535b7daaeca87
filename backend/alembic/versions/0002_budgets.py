"""budget counters, reservations and limit overrides

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27

Written by hand. Besides the tables, the upgrade seeds the counters of the current windows
(every task's lifetime, each user's current UTC day and month, the global current day) from the
daily rollup, so spend recorded before budgets existed still counts against them.
"""

from collections.abc import Sequence
from datetime import UTC, date, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TASK_WINDOW = date(1970, 1, 1)


def upgrade() -> None:
    op.create_table(
        "budget_counter",
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("subject_id", sa.String(length=64), nullable=False),
        sa.Column("window_start", sa.Date(), nullable=False),
        sa.Column("spent_pico_usd", sa.BigInteger(), nullable=False),
        sa.Column("reserved_pico_usd", sa.BigInteger(), nullable=False),
        sa.Column("soft_warned", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint(
            "scope", "subject_id", "window_start", name=op.f("pk_budget_counter")
        ),
    )
    op.create_table(
        "budget_reservation",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("amount_pico_usd", sa.BigInteger(), nullable=False),
        sa.Column("task_id", sa.String(length=64), nullable=True),
        sa.Column("user_id", sa.String(length=64), nullable=True),
        sa.Column(
            "window_day",
            sa.Date(),
            nullable=False,
            comment="UTC day (and so month) it was taken",
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_budget_reservation")),
    )
    op.create_index(
        "ix_budget_reservation_expires_at", "budget_reservation", ["expires_at"], unique=False
    )
    op.create_table(
        "budget_limit_override",
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("subject_id", sa.String(length=64), nullable=False),
        sa.Column("limit_pico_usd", sa.BigInteger(), nullable=True),
        sa.Column("soft_threshold", sa.Numeric(precision=5, scale=4), nullable=True),
        sa.Column("updated_by", sa.String(length=64), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("scope", "subject_id", name=op.f("pk_budget_limit_override")),
    )
    _seed_counters_from_rollup()


def _seed_counters_from_rollup() -> None:
    now = datetime.now(UTC)
    today = now.date()
    values = {"task_window": TASK_WINDOW, "today": today, "month": today.replace(day=1)}
    insert = (
        "INSERT INTO budget_counter (scope, subject_id, window_start, spent_pico_usd, "
        "reserved_pico_usd, soft_warned, updated_at) "
    )
    sums = (
        ("task_window", "SELECT 'task', task_id, :task_window, SUM(cost_pico_usd), 0, false, :now "
         "FROM usage_rollup_daily WHERE task_id <> '' GROUP BY task_id"),
        ("today", "SELECT 'user_daily', user_id, :today, SUM(cost_pico_usd), 0, false, :now "
         "FROM usage_rollup_daily WHERE user_id <> '' AND day = :today GROUP BY user_id"),
        ("month", "SELECT 'user_monthly', user_id, :month, SUM(cost_pico_usd), 0, false, :now "
         "FROM usage_rollup_daily WHERE user_id <> '' AND day >= :month GROUP BY user_id"),
        ("today", "SELECT 'global_daily', '', :today, SUM(cost_pico_usd), 0, false, :now "
         "FROM usage_rollup_daily WHERE day = :today HAVING COUNT(*) > 0"),
    )  # fmt: skip
    for window, select in sums:
        op.execute(
            sa.text(insert + select).bindparams(
                sa.bindparam(window, values[window], type_=sa.Date()),
                sa.bindparam("now", now, type_=sa.DateTime(timezone=True)),
            )
        )


def downgrade() -> None:
    op.drop_table("budget_limit_override")
    op.drop_index("ix_budget_reservation_expires_at", table_name="budget_reservation")
    op.drop_table("budget_reservation")
    op.drop_table("budget_counter")
