"""The token bucket, on a clock the test moves."""

from __future__ import annotations

import pytest

from app.core.rate_limit import TokenBucketLimiter


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
