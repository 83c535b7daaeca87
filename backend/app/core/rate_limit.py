"""Token buckets per caller: shared in PostgreSQL, in memory on SQLite.

On PostgreSQL (:class:`DatabaseTokenBucketLimiter`) every process and machine of the deployment
takes its tokens from one row per caller in ``rate_limit_buckets``, with one atomic
``INSERT ... ON CONFLICT DO UPDATE ... RETURNING`` per check: three API processes give a caller
the one limit, not three. The database was chosen over Redis because the deployment already has
it and needs nothing else; a check costs one short write on a table of a few rows (one per
caller active in the last refill period, see ``prune``), and times come from the database's
clock, so machines whose clocks disagree still agree on the bucket.

On SQLite, the embedded single-machine default, the buckets stay in each process's memory
(:class:`TokenBucketLimiter`): a write per submission would queue behind the usage writer on the
one file lock, and N server processes on one machine give a caller up to N times the rate.

Written by hand because the bucket is twenty lines and the libraries for it bring a storage
layer (Redis, memcached) we do not want.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings

logger = logging.getLogger(__name__)


class RateLimiter(Protocol):
    def acquire(self, key: str) -> float:
        """Take one token for ``key``: 0.0 when granted, else the seconds until one is free."""
        ...


def _validate(rate_per_minute: float, burst: int) -> None:
    if rate_per_minute <= 0 or burst < 1:
        raise ValueError("rate_per_minute must be > 0 and burst >= 1")


class TokenBucketLimiter:
    """``burst`` requests at once, refilled at ``rate_per_minute``; one bucket per key, in this
    process's memory."""

    MAX_KEYS = 10_000  # a full table is cleared: every bucket starts full again, never emptier

    def __init__(
        self,
        rate_per_minute: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _validate(rate_per_minute, burst)
        self.rate_per_second = rate_per_minute / 60.0
        self.burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, updated at)
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float:
        """Take one token for ``key``: 0.0 when granted, else the seconds until one is free."""
        now = self._clock()
        with self._lock:
            tokens, updated = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - updated) * self.rate_per_second)
            if tokens >= 1.0:
                if key not in self._buckets and len(self._buckets) >= self.MAX_KEYS:
                    self._buckets.clear()
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate_per_second


# The database's clock, read once per statement: EXCLUDED.refilled_at below is this value.
_DB_NOW = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"
# The bucket refilled up to now (never past ``burst``; a clock that steps back refills nothing).
_REFILLED = (
    "LEAST(:burst, b.tokens + GREATEST(0, EXCLUDED.refilled_at - b.refilled_at) * :rate_per_second)"
)
# One statement, so one atomic step under the row lock ON CONFLICT takes: a new caller starts
# with a full bucket less one token; a known one is refilled, then pays one token if it has one.
# ``granted`` records which, for RETURNING (which sees only the new row).
_TAKE_TOKEN = text(
    f"""
    INSERT INTO rate_limit_buckets AS b (bucket_key, tokens, refilled_at, granted)
    VALUES (:bucket_key, :burst - 1, {_DB_NOW}, true)
    ON CONFLICT (bucket_key) DO UPDATE SET
        tokens = CASE WHEN {_REFILLED} >= 1 THEN {_REFILLED} - 1 ELSE {_REFILLED} END,
        refilled_at = GREATEST(b.refilled_at, EXCLUDED.refilled_at),
        granted = {_REFILLED} >= 1
    RETURNING tokens, granted
    """  # noqa: S608 - the interpolated parts are constants above, never input
)
_PRUNE = text(
    f"DELETE FROM rate_limit_buckets WHERE refilled_at < {_DB_NOW} - :full_after "  # noqa: S608
    "AND bucket_key LIKE :prefix"
)


class DatabaseTokenBucketLimiter:
    """The same bucket as :class:`TokenBucketLimiter`, kept in ``rate_limit_buckets`` (on
    PostgreSQL) so that every process on the database shares it.

    If the database cannot be reached the check lets the request through (and logs it): the
    limit is a guard against floods, and the request it guards needs the database anyway.
    """

    PRUNE_INTERVAL_SECONDS = 60.0

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        rate_per_minute: float,
        burst: int,
        *,
        scope: str = "task_submit",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _validate(rate_per_minute, burst)
        self.rate_per_second = rate_per_minute / 60.0
        self.burst = float(burst)
        self._session_factory = session_factory
        self._prefix = f"{scope}:"
        self._clock = clock
        self._next_prune = clock()
        self._prune_lock = threading.Lock()

    @property
    def full_after_seconds(self) -> float:
        """How long an untouched bucket takes to refill completely from empty."""
        return self.burst / self.rate_per_second

    def acquire(self, key: str) -> float:
        """Take one token for ``key``: 0.0 when granted, else the seconds until one is free."""
        params = {
            "bucket_key": self._prefix + key,
            "burst": self.burst,
            "rate_per_second": self.rate_per_second,
        }
        try:
            with self._session_factory() as session, session.begin():
                tokens, granted = session.execute(_TAKE_TOKEN, params).one()
        except SQLAlchemyError:
            logger.warning("Rate limit: the bucket cannot be read; letting the request through")
            return 0.0
        self._prune_when_due()
        if granted:
            return 0.0
        return (1.0 - float(tokens)) / self.rate_per_second

    def prune(self) -> int:
        """Delete the buckets that have been full again for a refill period; returns how many.

        A full bucket behaves exactly as a missing row (the next check starts it full), so the
        table holds only the callers active in the last ``2 x full_after_seconds``.
        """
        params = {"full_after": 2 * self.full_after_seconds, "prefix": self._prefix + "%"}
        with self._session_factory() as session, session.begin():
            deleted: int = getattr(session.execute(_PRUNE, params), "rowcount", 0)
        return deleted

    def _prune_when_due(self) -> None:
        now = self._clock()
        if now < self._next_prune or not self._prune_lock.acquire(blocking=False):
            return
        try:
            self._next_prune = now + self.PRUNE_INTERVAL_SECONDS
            self.prune()
        except SQLAlchemyError:
            logger.warning("Rate limit: pruning old buckets failed; retrying later", exc_info=True)
        finally:
            self._prune_lock.release()


def submit_rate_limiter(
    settings: Settings, session_factory: sessionmaker[Session]
) -> RateLimiter | None:
    """The task-submission limiter of ``settings`` (None: no limit): shared in the database on
    PostgreSQL, per process on SQLite (see the module docstring)."""
    if settings.task_submit_rate_per_minute <= 0:
        return None
    rate, burst = settings.task_submit_rate_per_minute, settings.task_submit_burst
    if make_url(settings.database_url).get_backend_name() == "postgresql":
        return DatabaseTokenBucketLimiter(session_factory, rate, burst)
    return TokenBucketLimiter(rate, burst)
