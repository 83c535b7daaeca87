"""Knowing, without a query, that no budget override changed since a call's limits were read.

Every LLM call needs the limits of its task and user before it is made, and they rarely change.
On SQLite, whose processes all share one machine, every committed override change appends one
byte to a sentinel file beside the database (``<database>.limits``); a process keeps the limits
it read for a task and user and reuses them while the file's size is what it was before that
read, for at most ``LIMITS_REUSE_SECONDS`` (so a change made without the signal, by hand in SQL
or by a process that died between its commit and the append, still applies within that time).
One ``stat`` instead of one query a call. On PostgreSQL there is no signal: limits are read
every time (in the reservation's own transaction).

The file does not grow for ever: the change that takes it to ``MAX_SIGNAL_BYTES`` replaces it
with a new one-byte file (``os.replace``, atomic), whose inode differs from the one it
replaces: that too changes the version, so readers see every change as before. An append made
by a process that opened the old file just before the replacement lands in the replaced file,
but the replacement itself came after that process's commit, so the change is seen.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from app.core.prepared import per_engine

logger = logging.getLogger(__name__)

T = TypeVar("T")
LIMITS_REUSE_SECONDS = 2.0
MAX_CACHED = 4096
MAX_SIGNAL_BYTES = 4096


class OverrideSignal:
    """The sentinel file of one SQLite database; a no-op (no version) elsewhere."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    @classmethod
    def for_engine(cls, engine: Engine) -> OverrideSignal:
        url = make_url(str(engine.url))
        if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
            return cls(None)
        return cls(Path(f"{url.database}.limits"))

    def version(self) -> tuple[int, int] | None:
        """Changes whenever an override change commits; None: no signal, always read."""
        if self.path is None:
            return None
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return (0, 0)
        except OSError:
            return None
        return (stat.st_ino, stat.st_size)

    def announce(self) -> None:
        """An override change committed: every process re-reads its limits."""
        if self.path is None:
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, b".")
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if size >= MAX_SIGNAL_BYTES:
                self._start_afresh()
        except OSError as exc:  # the reuse limit still bounds how long a stale limit lives
            logger.warning("Could not signal a budget override change: %s", exc)

    def _start_afresh(self) -> None:
        assert self.path is not None
        fresh = self.path.with_name(f"{self.path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
        fresh.write_bytes(b".")
        os.replace(fresh, self.path)

    def announce_after_commit(self, session: Session) -> None:
        """Announce once ``session``'s transaction commits (not before: a process that re-read
        the limits in between would see the old ones and keep them)."""
        if self.path is not None:
            event.listen(session, "after_commit", lambda _s: self.announce(), once=True)


override_signal = per_engine(OverrideSignal.for_engine)
"""The engine's signal (one per engine, shared by its guard and its writers)."""


class LimitsCache(Generic[T]):
    """Limits read per (task, user), reused while the signal says nothing changed."""

    def __init__(self, signal: OverrideSignal) -> None:
        self._signal = signal
        self._entries: OrderedDict[
            tuple[str | None, str | None], tuple[tuple[int, int], float, T]
        ] = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self,
        task_id: str | None,
        user_id: str | None,
        read: Callable[[], T | None],
    ) -> T | None:
        """The limits of this task and user: cached, or ``read()`` now (None is not kept)."""
        version = self._signal.version()
        if version is None:
            return read()
        key = (task_id, user_id)
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None and entry[0] == version and now - entry[1] < LIMITS_REUSE_SECONDS:
            return entry[2]
        limits = read()  # after taking the version: a change from now on invalidates it
        if limits is None:
            return None
        with self._lock:
            self._entries[key] = (version, now, limits)
            self._entries.move_to_end(key)
            while len(self._entries) > MAX_CACHED:
                self._entries.popitem(last=False)
        return limits


def announce_after_commit(session: Session) -> None:
    """Signal the override change ``session`` is making, once its transaction commits."""
    bind = session.get_bind()
    engine = bind if isinstance(bind, Engine) else bind.engine
    override_signal(engine).announce_after_commit(session)
