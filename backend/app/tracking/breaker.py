"""A circuit breaker on the database, one per engine (``database_breaker(engine)``).

Closed, tracking and budget transactions go to the database as usual. The first one that meets
an outage (PostgreSQL unreachable, a SQLite file locked past its busy timeout, a dead
connection) opens it: that call has paid the one timeout; from then on every transaction routed
through ``transaction()`` fails at once with ``DatabaseUnavailable`` (a ``SQLAlchemyError``, so
callers that handle database errors handle it too): usage rows go straight to the spool, with
their budget settlements, and reservations are decided without the database
(``app.budgets.guard``). A background thread probes the database every ``PROBE_INTERVAL_SECONDS``
(on SQLite it asks for the write lock, as a writer would; on PostgreSQL it runs ``SELECT 1``) and
closes the breaker when the probe succeeds; recovery listeners (the spool replayer) are then
woken, so the spool is replayed within moments of the database coming back.

Errors that say nothing about the database's health do not open it: a serialization failure or
deadlock (SQLSTATE class 40), a constraint violation, a programming error.

Its state is the ``asa_database_breaker_open`` gauge and ``/health``'s ``database_breaker``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from app.core.prepared import Tx, WriteGate, per_engine
from app.observability import DATABASE_BREAKER_OPEN, DATABASE_BREAKER_TRIPS

logger = logging.getLogger(__name__)

PROBE_INTERVAL_SECONDS = 0.5
# A PostgreSQL that does not answer (a dead host, a dropped route) costs a new connection this
# long, not the operating system's TCP timeout of minutes; a refused connection fails at once.
POSTGRES_CONNECT_TIMEOUT_SECONDS = 3
BreakerState = Literal["closed", "open"]


def engine_timeouts(url: str) -> dict[str, Any]:
    """``create_db_engine`` arguments bounding the wait for a database that does not answer
    (on SQLite that is ``SQLITE_BUSY_TIMEOUT_SECONDS``, set by ``create_db_engine`` itself)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql" or "connect_timeout" in parsed.query:
        return {}
    return {"connect_args": {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_SECONDS}}


class DatabaseUnavailable(SQLAlchemyError):
    """The database breaker is open: the transaction was not attempted."""


def is_outage(exc: BaseException) -> bool:
    """True for an error that says the database cannot be reached or written now."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    if not isinstance(exc, OperationalError | InterfaceError):
        return False
    sqlstate = getattr(exc.orig, "sqlstate", None)
    # Class 40 (serialization failure, deadlock): the transaction lost a race, the database is fine.
    return not (isinstance(sqlstate, str) and sqlstate.startswith("40"))


def lost_a_race(exc: BaseException) -> bool:
    """True for a transaction PostgreSQL ended because it lost a race with another one (a
    deadlock or a serialization failure, SQLSTATE class 40): running it again is the remedy."""
    if not isinstance(exc, DBAPIError):
        return False
    sqlstate = getattr(exc.orig, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate.startswith("40")


class DatabaseBreaker:
    """Opens on an outage, probes in the background, closes when the database answers."""

    def __init__(self, engine: Engine, *, probe_interval: float = PROBE_INTERVAL_SECONDS) -> None:
        self._engine = engine
        self._probe_interval = probe_interval
        self._open = False
        self._lock = threading.Lock()
        self._closed_event = threading.Event()  # set by ``close()``: no more probing
        self._prober: threading.Thread | None = None
        self._listeners: list[Callable[[], None]] = []

    @property
    def state(self) -> BreakerState:
        return "open" if self._open else "closed"

    @property
    def is_open(self) -> bool:
        return self._open

    def check(self) -> None:
        """Raise ``DatabaseUnavailable`` while the breaker is open."""
        if self._open:
            raise DatabaseUnavailable("the database is unavailable (circuit breaker open)")

    def on_recovery(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (on the probe thread; it must not block) each time it closes."""
        with self._lock:
            self._listeners.append(listener)

    @contextmanager
    def transaction(self, gate: WriteGate, *, write: bool = True) -> Iterator[Tx]:
        """``gate.transaction()``, refused at once while open; an outage inside opens it.

        Checked again once the gate admits the transaction: on SQLite a writer may have queued
        behind the one whose timeout opened the breaker, and must not pay a second one.
        """
        self.check()
        try:
            with gate.transaction(write=write) as tx:
                self.check()
                yield tx
        except DBAPIError as exc:
            self.record_failure(exc)
            raise

    @contextmanager
    def connection(self) -> Iterator[Any]:
        """``engine.begin()`` through the breaker (for Core statements off the hot path)."""
        self.check()
        try:
            with self._engine.begin() as conn:
                yield conn
        except DBAPIError as exc:
            self.record_failure(exc)
            raise

    def record_failure(self, exc: BaseException) -> bool:
        """Open the breaker if ``exc`` is an outage; True if this call opened it."""
        if not is_outage(exc):
            return False
        return self.trip(exc)

    def trip(self, reason: object) -> bool:
        """Open the breaker for ``reason`` (an outage met here, or by the service's writer
        process); True if this call opened it. It probes and closes as after any outage."""
        with self._lock:
            if self._open or self._closed_event.is_set():
                return False
            self._open = True
            DATABASE_BREAKER_OPEN.set(1)
            DATABASE_BREAKER_TRIPS.inc()
            self._prober = threading.Thread(target=self._probe_loop, name="db-breaker", daemon=True)
            self._prober.start()
        logger.warning(
            "Database unavailable; circuit breaker open, probing for recovery: %s", reason
        )
        return True

    def close(self) -> None:
        """Stop probing (the runtime is closing); the breaker stays as it is."""
        self._closed_event.set()
        prober = self._prober
        if prober is not None and prober is not threading.current_thread():
            prober.join(timeout=10)

    # -- the probe ------------------------------------------------------------------------

    def probe_now(self) -> bool:
        """Probe at once (not at the next interval) and close if the database answers; True if
        the breaker is closed afterwards. For a last write that cannot wait, e.g. the spool's
        final replay at shutdown, which would otherwise be refused for up to one interval."""
        if not self._open:
            return True
        if not self._probe():
            return False
        self._mark_recovered()
        return True

    def _mark_recovered(self) -> None:
        with self._lock:
            if not self._open:
                return
            self._open = False
            listeners = list(self._listeners)
        DATABASE_BREAKER_OPEN.set(0)
        logger.warning("Database reachable again; circuit breaker closed")
        for listener in listeners:
            try:
                listener()
            except Exception:
                logger.exception("A database recovery listener failed")

    def _probe_loop(self) -> None:
        while not self._closed_event.wait(self._probe_interval):
            if not self._open:
                return  # closed by ``probe_now``
            if self._probe():
                self._mark_recovered()
                return

    def _probe(self) -> bool:
        try:
            if self._engine.dialect.name == "sqlite":
                return self._probe_sqlite_write_lock()
            with self._engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception as exc:
            logger.debug("Database probe failed: %s", exc)
            return False

    def _probe_sqlite_write_lock(self) -> bool:
        """Take and give back the write lock without waiting: a locked file is still down."""
        raw = self._engine.raw_connection()
        try:
            cursor = raw.cursor()
            busy_ms = cursor.execute("PRAGMA busy_timeout").fetchone()[0]
            cursor.execute("PRAGMA busy_timeout=0")
            try:
                raw.rollback()
                cursor.execute("BEGIN IMMEDIATE")
                cursor.execute("ROLLBACK")
            finally:
                cursor.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
                cursor.close()
            return True
        finally:
            raw.close()


database_breaker = per_engine(DatabaseBreaker)
"""The engine's breaker: one per engine, shared by its writer, budget guard and ``/health``."""
