"""finished tasks' outcomes snapshot at finish, their rollups, and late calls flagged

Revision ID: 0017
Revises: 0016
Create Date: 2026-11-30

Written by hand. The recommendations joined the finished tasks of a window to
``usage_rollup_daily`` and ``usage_rollup_task_total`` (2.3 s cold at 10M calls). From now on a
task that finishes with an outcome (succeeded, failed, budget_exceeded, error) is snapshot in
the transaction that finishes it (``app.usage.outcomes``): ``task_outcomes`` (its owner,
repository, model, status, UTC finish day and total cost), ``task_outcome_parts`` (its spend
per agent and model the agent called) and two rollups everyone's recommendations read,
``task_outcome_rollup_agent`` (per finish day, status, agent and model: tasks and cost) and
``task_outcome_rollup_repo`` (per repository, the task's model, finish day and status; and
over all repositories, as repository ''), with ``task_outcome_rollup_pair`` (per repository
and model, all time: the pairs that have enough tasks to be compared at all).
``usage_rollup_task_total.late`` flags a task a call reached after its snapshot (a partial
index keeps the flagged few cheap to find).

Filled from the tasks finished so far, ``usage_rollup_daily`` (per task, agent and model) and
``usage_rollup_task_total`` (the total), set-based: parts, then the rollups from the parts and
the tasks, then the snapshot rows; indexes after the fill. Upgrade with the writers stopped, as
``auto_migrate`` does at start-up.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OUTCOMES = "task_outcomes"
PARTS = "task_outcome_parts"
AGENT = "task_outcome_rollup_agent"
REPO = "task_outcome_rollup_repo"
PAIR = "task_outcome_rollup_pair"
ALL_REPOSITORIES = ""  # ``app.usage.outcomes.ALL_REPOSITORIES`` as of this revision
TOTAL = "usage_rollup_task_total"
# The outcome statuses as of this revision (``app.usage.outcomes.OUTCOME_STATUSES``).
FINISHED = (
    "t.status IN ('succeeded', 'failed', 'budget_exceeded', 'error') AND t.finished_at IS NOT NULL"
)


def _day(dialect: str) -> str:
    """The UTC day of ``t.finished_at`` as each dialect stores a timezone-aware DateTime."""
    return (
        "(timezone('UTC', t.finished_at))::date"
        if dialect == "postgresql"
        else ("date(t.finished_at)")
    )


def fill_sql(dialect: str) -> list[str]:
    """The fill, in order; every name in it is this module's constant."""
    day = _day(dialect)
    return [
        f"INSERT INTO {PARTS} (task_id, agent, model, cost_pico_usd) "  # noqa: S608
        "SELECT d.task_id, d.agent, d.model, SUM(d.cost_pico_usd) FROM usage_rollup_daily d "
        f"JOIN tasks t ON t.id = d.task_id WHERE {FINISHED} GROUP BY d.task_id, d.agent, d.model",
        f"INSERT INTO {AGENT} (finish_day, status, agent, model, tasks, cost_pico_usd) "  # noqa: S608
        f"SELECT {day}, t.status, p.agent, p.model, COUNT(*), SUM(p.cost_pico_usd) "
        f"FROM {PARTS} p JOIN tasks t ON t.id = p.task_id GROUP BY 1, 2, 3, 4",
        f"INSERT INTO {REPO} (repo_url, model, finish_day, status, tasks, cost_pico_usd) "  # noqa: S608
        f"SELECT t.repo_url, t.model, {day}, t.status, COUNT(*), "
        f"SUM(COALESCE(tt.cost_pico_usd, 0)) FROM tasks t "
        f"LEFT JOIN {TOTAL} tt ON tt.task_id = t.id WHERE {FINISHED} GROUP BY 1, 2, 3, 4",
        f"INSERT INTO {PAIR} (repo_url, model, tasks) "  # noqa: S608
        f"SELECT repo_url, model, SUM(tasks) FROM {REPO} GROUP BY repo_url, model",
        f"INSERT INTO {REPO} (repo_url, model, finish_day, status, tasks, cost_pico_usd) "  # noqa: S608
        f"SELECT '{ALL_REPOSITORIES}', model, finish_day, status, SUM(tasks), SUM(cost_pico_usd) "
        f"FROM {REPO} GROUP BY model, finish_day, status",
        f"INSERT INTO {OUTCOMES} (task_id, finished_at, finish_day, user_id, status, "  # noqa: S608
        "repo_url, model, cost_pico_usd) "
        f"SELECT t.id, t.finished_at, {day}, t.user_id, t.status, t.repo_url, t.model, "
        f"COALESCE(tt.cost_pico_usd, 0) FROM tasks t LEFT JOIN {TOTAL} tt ON tt.task_id = t.id "
        f"WHERE {FINISHED}",
    ]


def _sums() -> list[sa.Column[int]]:
    return [
        sa.Column("tasks", sa.BigInteger(), nullable=False),
        sa.Column("cost_pico_usd", sa.BigInteger(), nullable=False),
    ]


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    # A constant default: PostgreSQL adds the column without rewriting the table.
    op.add_column(TOTAL, sa.Column("late", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_index(
        f"ix_{TOTAL}_late",
        TOTAL,
        ["task_id"],
        unique=False,
        postgresql_where=sa.text("late"),
        sqlite_where=sa.text("late"),
    )
    op.create_table(
        OUTCOMES,
        sa.Column("task_id", sa.String(length=64), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finish_day", sa.Date(), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("repo_url", sa.Text(), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("cost_pico_usd", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("task_id", name=op.f(f"pk_{OUTCOMES}")),
    )
    op.create_table(
        PARTS,
        sa.Column("task_id", sa.String(length=64), nullable=False),
        sa.Column("agent", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("cost_pico_usd", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("task_id", "agent", "model", name=op.f(f"pk_{PARTS}")),
    )
    op.create_table(
        AGENT,
        sa.Column("finish_day", sa.Date(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("agent", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        *_sums(),
        sa.PrimaryKeyConstraint("finish_day", "status", "agent", "model", name=op.f(f"pk_{AGENT}")),
    )
    op.create_table(
        REPO,
        sa.Column("repo_url", sa.Text(), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("finish_day", sa.Date(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        *_sums(),
        sa.PrimaryKeyConstraint(
            "repo_url", "model", "finish_day", "status", name=op.f(f"pk_{REPO}")
        ),
    )
    op.create_table(
        PAIR,
        sa.Column("repo_url", sa.Text(), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("tasks", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("repo_url", "model", name=op.f(f"pk_{PAIR}")),
    )
    for statement in fill_sql(dialect):
        op.execute(statement)
    # Made after the fill: one sort instead of an index update per row.
    op.create_index(
        f"ix_{OUTCOMES}_user_id_finish_day", OUTCOMES, ["user_id", "finish_day"], unique=False
    )
    op.create_index(f"ix_{OUTCOMES}_finished_at", OUTCOMES, ["finished_at"], unique=False)
    op.create_index(f"ix_{PAIR}_tasks", PAIR, ["tasks"], unique=False)
    if dialect == "postgresql":  # the planner's statistics of the new tables, now
        op.execute(f"ANALYZE {OUTCOMES}, {PARTS}, {AGENT}, {REPO}, {PAIR}, {TOTAL}")


def downgrade() -> None:
    op.drop_index(f"ix_{PAIR}_tasks", table_name=PAIR)
    op.drop_index(f"ix_{OUTCOMES}_finished_at", table_name=OUTCOMES)
    op.drop_index(f"ix_{OUTCOMES}_user_id_finish_day", table_name=OUTCOMES)
    for table in (PAIR, REPO, AGENT, PARTS, OUTCOMES):
        op.drop_table(table)
    op.drop_index(f"ix_{TOTAL}_late", table_name=TOTAL)
    with op.batch_alter_table(TOTAL) as batch:
        batch.drop_column("late")
