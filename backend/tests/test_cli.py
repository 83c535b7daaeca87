"""``asa keys ...`` as a real subprocess against a fresh SQLite database."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.access import api_keys
from app.core.db import create_db_engine, create_session_factory, transaction


def asa_command() -> list[str]:
    script = Path(sys.executable).parent / "asa"
    if script.exists():
        return [str(script)]
    found = shutil.which("asa")
    return [found] if found else [sys.executable, "-m", "app.cli"]


@pytest.fixture
def run_asa(tmp_path: Path) -> object:
    database_url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "AUTO_MIGRATE"}}
    env["DATABASE_URL"] = database_url

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*asa_command(), *args],
            cwd=tmp_path,  # no .env here
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    run.database_url = database_url  # type: ignore[attr-defined]
    return run


def test_keys_are_created_listed_and_revoked_from_the_command_line(run_asa: object) -> None:
    run = run_asa  # type: ignore[assignment]

    created = run("keys", "create", "--user", "alice", "--admin", "--name", "laptop")
    assert created.returncode == 0, created.stderr
    alice_key = created.stdout.strip()
    assert alice_key.startswith("asa_") and "\n" not in alice_key
    assert "cannot be shown again" in created.stderr and alice_key not in created.stderr

    as_json = run("keys", "create", "--user", "bob", "--json")
    assert as_json.returncode == 0, as_json.stderr
    bob = json.loads(as_json.stdout)
    assert (bob["user_id"], bob["role"]) == ("bob", "user") and bob["key"].startswith("asa_")

    table = run("keys", "list")
    assert table.returncode == 0, table.stderr
    assert "alice" in table.stdout and "admin" in table.stdout and "laptop" in table.stdout
    assert bob["id"] in table.stdout
    assert alice_key not in table.stdout and bob["key"] not in table.stdout

    revoked = run("keys", "revoke", bob["id"])
    assert revoked.returncode == 0, revoked.stderr
    rows = {r["user_id"]: r for r in json.loads(run("keys", "list", "--json").stdout)}
    assert rows["bob"]["revoked_at"] is not None and rows["alice"]["revoked_at"] is None
    assert "key" not in rows["alice"]

    engine = create_db_engine(run.database_url)  # type: ignore[attr-defined]
    try:
        with transaction(create_session_factory(engine)) as session:
            alice = api_keys.verify_key(session, alice_key)
            assert alice is not None and alice.role == "admin"
            assert api_keys.verify_key(session, bob["key"]) is None
    finally:
        engine.dispose()


def test_mistakes_exit_non_zero_with_a_message(run_asa: object) -> None:
    run = run_asa  # type: ignore[assignment]

    unknown = run("keys", "revoke", "0" * 32)
    assert unknown.returncode == 1 and "No API key" in unknown.stderr
    invalid = run("keys", "create", "--user", "alice smith")
    assert invalid.returncode == 1 and "user_id" in invalid.stderr
    usage = run("keys", "create")
    assert usage.returncode == 2 and "--user" in usage.stderr
