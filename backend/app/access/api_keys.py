"""API keys: issue, list, revoke and verify.

A key reads ``asa_<prefix>_<secret>``: ``prefix`` is 12 random hex characters, public (shown by
``asa keys list``) and unique, used to find the row; ``secret`` is 256 random bits. Only the
SHA-256 digest of the whole key is stored. A fast hash is the right one here: slow, salted
hashes (bcrypt, argon2) exist to protect low-entropy passwords against guessing, and a 256-bit
random secret cannot be guessed, so they would only add latency to every request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.errors import InvalidInput, NotFound
from app.models import NAME_MAX_CHARS, USER_ID_PATTERN, ApiKey, utcnow
from app.models.api_keys import MAX_ALLOWED_MODELS, MODEL_MAX_CHARS

Role = Literal["user", "admin"]
ROLES: tuple[Role, ...] = ("user", "admin")
KEY_SCHEME = "asa_"
_USER_ID_RE = re.compile(USER_ID_PATTERN)
_KEY_RE = re.compile(r"asa_([0-9a-f]{12})_[A-Za-z0-9_-]{43}")
# last_used_at is written at most this often per key, so a busy key is not a write per request.
LAST_USED_RESOLUTION = timedelta(seconds=60)


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A new key's row and, this once, the key itself."""

    row: ApiKey
    key: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _new_key() -> tuple[str, str]:
    prefix = secrets.token_hex(6)
    return prefix, f"{KEY_SCHEME}{prefix}_{secrets.token_urlsafe(32)}"


def key_prefix(key: str) -> str | None:
    """The lookup prefix of a well-formed key, else None."""
    match = _KEY_RE.fullmatch(key)
    return match.group(1) if match else None


def check_allowed_models(models: Sequence[str] | None) -> list[str] | None:
    """A key's model allow-list, validated and de-duplicated (None: any model)."""
    if models is None:
        return None
    if isinstance(models, str) or len(models) > MAX_ALLOWED_MODELS:
        raise InvalidInput(
            f"allowed_models must be a list of at most {MAX_ALLOWED_MODELS} model names.",
            field="allowed_models",
        )
    checked: list[str] = []
    for model in models:
        if (
            not isinstance(model, str)
            or not model
            or len(model) > MODEL_MAX_CHARS
            or not model.isprintable()
        ):
            raise InvalidInput(
                f"each allowed model must be 1-{MODEL_MAX_CHARS} printable characters.",
                field="allowed_models",
            )
        if model not in checked:
            checked.append(model)
    return checked


def create_key(
    session: Session,
    *,
    user_id: str,
    role: Role = "user",
    name: str | None = None,
    allowed_models: Sequence[str] | None = None,
) -> IssuedKey:
    """Issue a key for ``user_id``; the returned ``key`` is never stored and cannot be shown
    again. ``allowed_models``: the only models it may call through the gateway (None: any)."""
    if not _USER_ID_RE.fullmatch(user_id):
        raise InvalidInput(
            "user_id must be 1-64 characters: letters, digits and . _ : @ - (not first).",
            field="user_id",
        )
    if role not in ROLES:
        raise InvalidInput("role must be 'user' or 'admin'.", field="role")
    if name is not None and (len(name) > NAME_MAX_CHARS or not name.isprintable()):
        raise InvalidInput(
            f"name must be at most {NAME_MAX_CHARS} printable characters.", field="name"
        )
    models = check_allowed_models(allowed_models)
    prefix, key = _new_key()
    row = ApiKey(
        user_id=user_id,
        role=role,
        name=name or None,
        prefix=prefix,
        key_hash=hash_key(key),
        allowed_models=models,
    )
    session.add(row)
    session.flush()
    return IssuedKey(row=row, key=key)


def list_keys(session: Session) -> list[ApiKey]:
    """Every key, revoked ones included, oldest first."""
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)))


def get_key(session: Session, key_id: str) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"No API key {key_id}.")
    return row


def revoke_key(session: Session, key_id: str) -> ApiKey:
    """Revoke a key (idempotent: a revoked key keeps its first ``revoked_at``)."""
    row = get_key(session, key_id)
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return row


def set_allowed_models(session: Session, key_id: str, models: Sequence[str] | None) -> ApiKey:
    """Replace a key's model allow-list (None: any model)."""
    row = get_key(session, key_id)
    row.allowed_models = check_allowed_models(models)
    session.flush()
    return row


def allowed_models(session: Session, key_id: str) -> list[str] | None:
    """The models a key may call (None: any, or no such key)."""
    value = session.scalar(select(ApiKey.allowed_models).where(ApiKey.id == key_id))
    return list(value) if isinstance(value, list) else None


def keys_configured(session: Session) -> bool:
    """True once any key was ever issued (revoked ones count: revoking every key does not
    reopen the service)."""
    return session.scalar(select(ApiKey.id).limit(1)) is not None


def verify_key(session: Session, key: str, now: datetime | None = None) -> ApiKey | None:
    """The live key row that ``key`` is, or None; records when it was last used."""
    presented = hash_key(key)  # hashed even when malformed, so failures cost the same
    prefix = key_prefix(key)
    if prefix is None:
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if row is None or row.revoked_at is not None:
        return None
    if not hmac.compare_digest(row.key_hash, presented):
        return None
    now = now or utcnow()
    last = row.last_used_at
    if last is not None and last.tzinfo is None:  # SQLite returns naive UTC
        last = last.replace(tzinfo=now.tzinfo)
    if last is None or now - last >= LAST_USED_RESOLUTION:
        session.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=now))
    return row
