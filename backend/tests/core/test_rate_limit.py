"""The token bucket: in memory on a clock the test moves, and shared in PostgreSQL."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.core.db import create_db_engine, create_session_factory
from app.core.rate_limit import DatabaseTokenBucketLimiter, TokenBucketLimiter, submit_rate_limiter
from app.models import RateLimitBucket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_is_granted_then_one_token_per_interval() -> None:
    clock = Clock()
    limiter = TokenBucketLimiter(rate_per_minute=6, burst=3, clock=clock)  # a token per 10 s

    assert [limiter.acquire("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("k") == pytest.approx(10.0)
    clock.now += 4
    assert limiter.acquire("k") == pytest.approx(6.0)
    clock.now += 6
    assert limiter.acquire("k") == 0.0
    assert limiter.acquire("k") == pytest.approx(10.0)


def test_buckets_are_per_key_and_refill_only_to_the_burst() -> None:
    clock = Clock()
    limiter = TokenBucketLimiter(rate_per_minute=60, burst=2, clock=clock)
    limiter.acquire("a")
    limiter.acquire("a")

    assert limiter.acquire("a") > 0
    assert limiter.acquire("b") == 0.0
    clock.now += 3600
    assert [limiter.acquire("a") for _ in range(3)][-1] > 0  # refilled to 2, not to 3600


def test_nonsense_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="rate_per_minute"):
        TokenBucketLimiter(rate_per_minute=0, burst=1)


# -- the bucket shared in PostgreSQL ----------------------------------------------------------


@pytest.fixture
def pg_sessions(postgresql_url: str) -> Iterator[sessionmaker[Session]]:
    engine = create_db_engine(postgresql_url)
    yield create_session_factory(engine)
    engine.dispose()


def test_the_database_bucket_grants_the_burst_then_says_when_a_token_is_free(
    pg_sessions: sessionmaker[Session],
) -> None:
    limiter = DatabaseTokenBucketLimiter(pg_sessions, rate_per_minute=0.6, burst=3)  # 1 per 100 s
    key = uuid.uuid4().hex

    assert [limiter.acquire(key) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.acquire(key)

    assert 99.0 < wait <= 100.0
    assert limiter.acquire(uuid.uuid4().hex) == 0.0  # another caller has a bucket of its own


def test_two_limiters_on_one_database_share_the_bucket(
    postgresql_url: str, pg_sessions: sessionmaker[Session]
) -> None:
    """Two processes' limiters (two objects, two connection pools) hold a caller to one burst,
    however many threads ask at once: the UPSERT is one atomic step."""
    engine = create_db_engine(postgresql_url)
    limiters = [
        DatabaseTokenBucketLimiter(pg_sessions, rate_per_minute=0.6, burst=5),
        DatabaseTokenBucketLimiter(create_session_factory(engine), rate_per_minute=0.6, burst=5),
    ]
    key = uuid.uuid4().hex
    with ThreadPoolExecutor(max_workers=8) as pool:
        waits = list(pool.map(lambda i: limiters[i % 2].acquire(key), range(24)))
    engine.dispose()

    assert waits.count(0.0) == 5
    assert all(w > 0 for w in waits if w != 0.0)


def test_buckets_full_again_are_pruned_and_active_ones_kept(
    pg_sessions: sessionmaker[Session],
) -> None:
    limiter = DatabaseTokenBucketLimiter(pg_sessions, rate_per_minute=60, burst=2)  # full in 2 s
    old, active = uuid.uuid4().hex, uuid.uuid4().hex
    limiter.acquire(old)
    limiter.acquire(active)
    with pg_sessions() as session, session.begin():
        session.execute(
            update(RateLimitBucket)
            .where(RateLimitBucket.bucket_key == f"task_submit:{old}")
            .values(refilled_at=RateLimitBucket.refilled_at - 5)
        )

    assert limiter.prune() >= 1
    with pg_sessions() as session:
        left = set(session.scalars(select(RateLimitBucket.bucket_key)))
    assert f"task_submit:{old}" not in left
    assert f"task_submit:{active}" in left


def test_an_unreachable_database_lets_the_request_through() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    engine = create_db_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{port}/none", connect_args={"connect_timeout": 1}
    )
    limiter = DatabaseTokenBucketLimiter(create_session_factory(engine), rate_per_minute=1, burst=1)

    assert [limiter.acquire("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    engine.dispose()


def test_postgresql_shares_the_limit_and_sqlite_keeps_it_per_process(
    postgresql_url: str, sqlite_url: str, pg_sessions: sessionmaker[Session]
) -> None:
    on_postgres = submit_rate_limiter(Settings(database_url=postgresql_url), pg_sessions)
    on_sqlite = submit_rate_limiter(Settings(database_url=sqlite_url), pg_sessions)
    off = submit_rate_limiter(
        Settings(database_url=postgresql_url, task_submit_rate_per_minute=0), pg_sessions
    )

    assert isinstance(on_postgres, DatabaseTokenBucketLimiter)
    assert isinstance(on_sqlite, TokenBucketLimiter)
    assert off is None
