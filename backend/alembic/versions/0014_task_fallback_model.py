"""tasks: a cheaper fallback model, when the task switched to it; indexes for similar tasks

Revision ID: 0014
Revises: 0009
Create Date: 2026-11-30

Written by hand. Two nullable columns: tasks submitted before this revision have no fallback
and never switched. Plain ADD/DROP COLUMN (SQLite does both in place since 3.35), so no batch
copy of ``tasks`` is needed. The two indexes serve a running task's projected cost
(``app.tasks.projection``): the latest finished tasks of a repository and model, or of a model.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "tasks",
        sa.Column(
            "fallback_model",
            sa.String(length=200),
            nullable=True,
            comment="The cheaper model the agents switch to when the budget runs low",
        ),
    )
    op.add_column("tasks", sa.Column("model_switched_at", sa.DateTime(timezone=True)))
    op.create_index(
        "ix_tasks_repo_url_model_finished_at", "tasks", ["repo_url", "model", "finished_at"]
    )
    op.create_index("ix_tasks_model_finished_at", "tasks", ["model", "finished_at"])


def downgrade() -> None:
    op.drop_index("ix_tasks_model_finished_at", table_name="tasks")
    op.drop_index("ix_tasks_repo_url_model_finished_at", table_name="tasks")
    op.drop_column("tasks", "model_switched_at")
    op.drop_column("tasks", "fallback_model")
