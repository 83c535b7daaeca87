"""Engine and session factory. Nothing connects at import time."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

logger = logging.getLogger(__name__)


def create_db_engine(url: str, *, sqlite_busy_timeout: float = 30.0, **kwargs: Any) -> Engine:
    """Build an engine tuned for a ledger: SQLite in WAL mode, pooled PostgreSQL; errors and
    logs never carry statement parameters (``hide_parameters``).

    ``sqlite_busy_timeout``: seconds a SQLite statement waits for another connection's lock
    before it fails (a usage row then goes to the spool).
    """
    parsed = make_url(url)
    # A statement's parameters are what users sent (bug text, repository URLs): an error's text,
    # which ends up in logs and tracebacks, shows the SQL but never them.
    kwargs.setdefault("hide_parameters", True)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        busy_ms = max(1, round(sqlite_busy_timeout * 1000))
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": sqlite_busy_timeout},
            **kwargs,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            # WAL + NORMAL: a committed row survives a process crash; readers never block writers.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    return create_engine(url, pool_pre_ping=True, **kwargs)


def create_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with factory() as session, session.begin():
        yield session


class SqliteCheckpointer:
    """Checkpoints a SQLite WAL from a background thread, off the callers' commits.

    Left alone, SQLite checkpoints inside the commit that takes the WAL past 1,000 pages: with
    the ~8 pages a tracked call writes, every ~100th call would copy the WAL into the database
    file and sync it before returning. A PASSIVE checkpoint here every ``interval`` seconds keeps
    the WAL short, so the commit path never reaches that threshold (which stays as the safety
    net). PASSIVE never waits for readers or writers; a failed checkpoint is simply retried.
    """

    def __init__(self, engine: Engine, interval: float = 0.2) -> None:
        self._engine = engine
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                raw = self._engine.raw_connection()
                try:
                    raw.cursor().execute("PRAGMA wal_checkpoint(PASSIVE)")
                finally:
                    raw.close()
            except Exception as exc:  # locked, disk full, engine disposed: try again later
                logger.debug("WAL checkpoint failed: %s", exc)
