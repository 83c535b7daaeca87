"""The ``api_keys`` table: who may call the API, stored only as hashes.

Rows are never deleted: a revoked key keeps its row (and ``revoked_at``) so the audit trail
and the "keys are configured" state survive. The schema is Alembic's."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, CheckConstraint, DateTime, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, new_id, utcnow

USER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$"
NAME_MAX_CHARS = 100
MAX_ALLOWED_MODELS = 100  # models on one key's allow-list
MODEL_MAX_CHARS = 200


class ApiKey(Base):
    """One API key of one user with one role (``user`` or ``admin``).

    ``prefix`` is the public, random lookup part of the key (``asa_<prefix>_<secret>``);
    ``key_hash`` is the SHA-256 hex digest of the whole key. ``allowed_models`` is the list of
    models the key may call through the gateway (NULL: any); a key's own budget is a ``key``
    budget limit (``budget_limit_override``, scope ``key``, subject the key's id).
    """

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(String(64), index=True)
    role: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    allowed_models: Mapped[list[str] | None] = mapped_column(JSON)

    __table_args__ = (CheckConstraint("role IN ('user', 'admin')", name="role"),)
