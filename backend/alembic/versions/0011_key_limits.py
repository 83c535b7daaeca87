"""key limits: a key's model allow-list, and the key of each budget reservation

``api_keys.allowed_models`` (JSON list, NULL: any model) is what the gateway lets a key call.
``budget_reservation.key_id`` is the key a reservation was taken for, so that releasing or
sweeping it also releases the ``key`` budget counter (a key's own budget: a ``key`` scope limit
in ``budget_limit_override``).

Revision ID: 0011
Revises: 0012
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("allowed_models", sa.JSON(), nullable=True))
    with op.batch_alter_table("budget_reservation", schema=None) as batch_op:
        batch_op.add_column(sa.Column("key_id", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("budget_reservation", schema=None) as batch_op:
        batch_op.drop_column("key_id")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("allowed_models")
