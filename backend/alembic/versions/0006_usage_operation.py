"""llm usage: the OpenAI API each call went through (chat, responses, embeddings)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30

Written by hand. Every row before this revision was a chat completion (the only API tracked),
so the server default ``'chat'`` is also the right value for them: adding the column fills it
without a separate update, on SQLite and PostgreSQL alike.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ALTER TABLE, not batch mode: a batch "move and copy" of llm_usage on SQLite would
    # drop the spend trigger of revision 0005 (SQLite adds and drops columns in place since
    # 3.35).
    op.add_column(
        "llm_usage",
        sa.Column(
            "operation",
            sa.String(length=16),
            server_default="chat",
            nullable=False,
            comment="The OpenAI API called: chat, responses or embeddings",
        ),
    )


def downgrade() -> None:
    op.drop_column("llm_usage", "operation")
