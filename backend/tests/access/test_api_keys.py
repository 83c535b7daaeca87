"""API keys in the database: only hashes stored, verification, revocation, on SQLite and
PostgreSQL."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from app.access import api_keys
from app.core.db import create_session_factory, transaction
from app.core.errors import InvalidInput, NotFound
from app.models import ApiKey, utcnow


@pytest.fixture
def session(engine: Engine) -> Session:
    factory = create_session_factory(engine)
    with factory() as s, s.begin():
        yield s


def test_a_key_is_stored_only_as_its_sha256(engine: Engine) -> None:
    with transaction(create_session_factory(engine)) as s:
        issued = api_keys.create_key(s, user_id="alice", name="laptop")

    with engine.connect() as conn:
        dumped = " ".join(
            str(v) for row in conn.execute(text("SELECT * FROM api_keys")) for v in row
        )
    secret = issued.key.split("_", 2)[2]  # asa_<prefix>_<secret>; the secret may hold "_"
    assert issued.key not in dumped and secret not in dumped
    assert hashlib.sha256(issued.key.encode()).hexdigest() in dumped


def test_keys_carry_256_random_bits_behind_a_public_prefix(session: Session) -> None:
    keys = {api_keys.create_key(session, user_id="alice").key for _ in range(20)}

    assert len(keys) == 20
    for key in keys:
        scheme, prefix, secret = key.split("_", 2)
        assert scheme == "asa" and len(prefix) == 12 and len(secret) == 43  # 32 bytes, base64url
        assert api_keys.key_prefix(key) == prefix


def test_verify_accepts_the_key_and_nothing_like_it(session: Session) -> None:
    issued = api_keys.create_key(session, user_id="alice", role="admin")
    key = issued.key

    row = api_keys.verify_key(session, key)
    assert row is not None and (row.user_id, row.role) == ("alice", "admin")
    flipped = key[:-1] + ("A" if key[-1] != "A" else "B")
    for wrong in [flipped, key + "x", key[:-1], key.upper(), "", "asa_", "Bearer " + key]:
        assert api_keys.verify_key(session, wrong) is None, wrong


def test_a_revoked_key_no_longer_verifies_and_revocation_is_idempotent(session: Session) -> None:
    issued = api_keys.create_key(session, user_id="alice")

    first = api_keys.revoke_key(session, issued.row.id).revoked_at
    again = api_keys.revoke_key(session, issued.row.id).revoked_at

    assert first is not None and again == first
    assert api_keys.verify_key(session, issued.key) is None
    with pytest.raises(NotFound):
        api_keys.revoke_key(session, "0" * 32)


def test_last_used_is_written_at_most_once_a_minute(session: Session) -> None:
    issued = api_keys.create_key(session, user_id="alice")
    start = utcnow()

    api_keys.verify_key(session, issued.key, now=start)
    api_keys.verify_key(session, issued.key, now=start + timedelta(seconds=30))
    session.expire_all()
    assert _last_used(session, issued.row.id) == start
    api_keys.verify_key(session, issued.key, now=start + timedelta(seconds=61))
    session.expire_all()
    assert _last_used(session, issued.row.id) == start + timedelta(seconds=61)


def _last_used(session: Session, key_id: str) -> object:
    value = session.scalar(select(ApiKey.last_used_at).where(ApiKey.id == key_id))
    assert value is not None
    return value if value.tzinfo else value.replace(tzinfo=utcnow().tzinfo)


def test_keys_are_configured_once_any_was_issued_even_if_revoked(session: Session) -> None:
    assert not api_keys.keys_configured(session)
    issued = api_keys.create_key(session, user_id="alice")
    api_keys.revoke_key(session, issued.row.id)

    assert api_keys.keys_configured(session)
    assert [r.id for r in api_keys.list_keys(session)] == [issued.row.id]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"user_id": ""}, "user_id"),
        ({"user_id": "-x"}, "user_id"),
        ({"user_id": "a b"}, "user_id"),
        ({"user_id": "a" * 65}, "user_id"),
        ({"user_id": "alice", "role": "root"}, "role"),
        ({"user_id": "alice", "name": "x" * 101}, "name"),
        ({"user_id": "alice", "name": "tab\there"}, "name"),
    ],
)
def test_invalid_keys_are_refused(session: Session, fields: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        api_keys.create_key(session, **fields)  # type: ignore[arg-type]
    assert refused.value.extra["field"] == field
