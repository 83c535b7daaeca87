"""A request's transaction commits before its response is sent: whatever a client does after
the answer sees what the request did (FastAPI ends a ``yield`` dependency after the response
unless it is declared with ``scope="function"``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ScratchDatabase
from tests.support.live_service import Live, live_service_on

ROUNDS = 25


@pytest.fixture(params=["sqlite", "postgresql"])
def live(
    request: pytest.FixtureRequest, tmp_path: Path, scratch_postgres_database: ScratchDatabase
) -> Iterator[Live]:
    with live_service_on(request.param, tmp_path, scratch_postgres_database) as service:
        yield service


def test_a_revoked_key_is_refused_by_the_very_next_request(live: Live) -> None:
    """The revocation commits (and the key's cached verification is dropped) before the 204:
    a request made the moment it arrives is refused, every time."""
    with live.api(live.admin_key) as admin:
        for i in range(ROUNDS):
            created = admin.post("/api/v1/admin/keys", json={"user_id": f"user-{i}"})
            assert created.status_code == 201, created.text
            key = created.json()
            with live.api(key["key"]) as user:
                assert user.get(f"/api/v1/usage/user/user-{i}").status_code == 200  # now cached
                assert admin.delete(f"/api/v1/admin/keys/{key['id']}").status_code == 204
                assert user.get(f"/api/v1/usage/user/user-{i}").status_code == 401, f"round {i}"


def test_a_key_is_usable_the_moment_its_creation_is_answered(live: Live) -> None:
    with live.api(live.admin_key) as admin:
        for i in range(ROUNDS):
            key = admin.post("/api/v1/admin/keys", json={"user_id": f"new-{i}"}).json()
            with live.api(key["key"]) as user:
                assert user.get(f"/api/v1/usage/user/new-{i}").status_code == 200, f"round {i}"
