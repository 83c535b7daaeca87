"""A token bucket per caller, in memory.

Limits are per process: with N server processes a caller gets up to N times the rate. That is
enough to stop one key from flooding the task queue by accident or on purpose; a deployment that
needs a cluster-wide limit puts it in its gateway. Written by hand because it is twenty lines and
the libraries for it bring a storage layer we do not want.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBucketLimiter:
    """``burst`` requests at once, refilled at ``rate_per_minute``; one bucket per key."""

    MAX_KEYS = 10_000  # a full table is cleared: every bucket starts full again, never emptier

    def __init__(
        self,
        rate_per_minute: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_minute <= 0 or burst < 1:
            raise ValueError("rate_per_minute must be > 0 and burst >= 1")
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
