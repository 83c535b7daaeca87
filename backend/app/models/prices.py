"""Price provenance: the price sources rows were priced from, and the audit of each recompute.

The schema is Alembic's (``alembic/versions/0009_price_provenance.py``)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, DateTime, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, new_id, utcnow


class PriceSourceRow(Base):
    """One price source (``llm_usage.price_source`` holds its ``ref``): a genai-prices snapshot,
    a local price file or a set of ``PRICE_OVERRIDES``. Written once, when first used."""

    __tablename__ = "price_source"

    ref: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), comment="genai-prices, file or overrides")
    version: Mapped[str] = mapped_column(
        String(64), comment="The package version, or the SHA-256 of the file or the overrides"
    )
    detail: Mapped[str] = mapped_column(Text, comment="The file's path, the overrides' JSON")
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class PriceRecompute(Base):
    """The audit record of one price recompute (``asa prices recompute`` or the admin API).

    Totals are over the rows the run examined: their cost and unpriced count before and after,
    and how many rows each price source had priced before and prices after (JSON objects).
    """

    __tablename__ = "price_recompute"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    actor: Mapped[str] = mapped_column(String(100), comment="Who ran it: a user id or cli:<name>")
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(String(16), comment="running, done or failed")
    dry_run: Mapped[bool] = mapped_column(Boolean, default=False)
    since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    until: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    model: Mapped[str | None] = mapped_column(String(200))
    provider: Mapped[str | None] = mapped_column(String(64))
    price_sources: Mapped[str] = mapped_column(
        Text, comment="JSON list of the refs of the prices the run applied"
    )
    sources_before: Mapped[str] = mapped_column(Text, default="{}")
    sources_after: Mapped[str] = mapped_column(Text, default="{}")
    rows_examined: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_changed: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_before_pico_usd: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_after_pico_usd: Mapped[int] = mapped_column(BigInteger, default=0)
    unpriced_before: Mapped[int] = mapped_column(BigInteger, default=0)
    unpriced_after: Mapped[int] = mapped_column(BigInteger, default=0)
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_price_recompute_started_at", "started_at"),)
