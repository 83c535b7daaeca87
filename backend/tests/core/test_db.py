"""The engine factory: SQLite's lock wait is the configured busy timeout."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from app.core.db import create_db_engine


def test_sqlite_busy_timeout_is_the_configured_one(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'a.db'}", sqlite_busy_timeout=0.25)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 250
    finally:
        engine.dispose()


def test_a_write_gives_up_after_the_busy_timeout_while_another_process_holds_the_lock(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.db"
    engine = create_db_engine(f"sqlite:///{path}", sqlite_busy_timeout=0.1)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(OperationalError, match="locked"), engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (1)"))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        engine.dispose()
