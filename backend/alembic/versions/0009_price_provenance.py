"""prices: provenance on each usage row, the price sources, and the recompute audit

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04

Written by hand. Revision ids are labels; this one follows 0008, the head when it was written.

``llm_usage`` gains ``price_source`` (the compact reference of the price table that priced the
row: ``genai-prices@<version>``, ``file:<sha256 prefix>`` or ``overrides:<sha256 prefix>``),
``price_entry`` (the entry that matched), ``price_tier`` (the variant or long-context tier that
chose among its prices) and ``service_tier`` (the tier the call ran in). All are NULL on older
rows: their source is unknown, and a recompute fills them. ``price_source`` describes each
reference once; ``price_recompute`` keeps one audit record per recompute.

Plain ALTER TABLE, not batch mode: a batch "move and copy" of llm_usage on SQLite would drop
the spend trigger of revision 0005 (SQLite adds and drops columns in place since 3.35).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = (
    ("price_source", 40),
    ("price_entry", 200),
    ("price_tier", 64),
    ("service_tier", 16),
)


def upgrade() -> None:
    for name, length in _COLUMNS:
        op.add_column("llm_usage", sa.Column(name, sa.String(length=length), nullable=True))
    op.create_table(
        "price_source",
        sa.Column("ref", sa.String(length=40), nullable=False),
        sa.Column(
            "kind", sa.String(length=16), nullable=False, comment="genai-prices, file or overrides"
        ),
        sa.Column(
            "version",
            sa.String(length=64),
            nullable=False,
            comment="The package version, or the SHA-256 of the file or the overrides",
        ),
        sa.Column(
            "detail", sa.Text(), nullable=False, comment="The file's path, the overrides' JSON"
        ),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("ref", name=op.f("pk_price_source")),
    )
    op.create_table(
        "price_recompute",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column(
            "actor",
            sa.String(length=100),
            nullable=False,
            comment="Who ran it: a user id or cli:<name>",
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "status", sa.String(length=16), nullable=False, comment="running, done or failed"
        ),
        sa.Column("dry_run", sa.Boolean(), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=True),
        sa.Column("provider", sa.String(length=64), nullable=True),
        sa.Column(
            "price_sources",
            sa.Text(),
            nullable=False,
            comment="JSON list of the refs of the prices the run applied",
        ),
        sa.Column("sources_before", sa.Text(), nullable=False),
        sa.Column("sources_after", sa.Text(), nullable=False),
        sa.Column("rows_examined", sa.BigInteger(), nullable=False),
        sa.Column("rows_changed", sa.BigInteger(), nullable=False),
        sa.Column("cost_before_pico_usd", sa.BigInteger(), nullable=False),
        sa.Column("cost_after_pico_usd", sa.BigInteger(), nullable=False),
        sa.Column("unpriced_before", sa.BigInteger(), nullable=False),
        sa.Column("unpriced_after", sa.BigInteger(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_price_recompute")),
    )
    op.create_index(
        "ix_price_recompute_started_at", "price_recompute", ["started_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_price_recompute_started_at", table_name="price_recompute")
    op.drop_table("price_recompute")
    op.drop_table("price_source")
    for name, _length in reversed(_COLUMNS):
        op.drop_column("llm_usage", name)
