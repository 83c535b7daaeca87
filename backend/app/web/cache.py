"""Figures of UTC days that have ended, kept for a short while.

An administrator's everyone-wide figures (the cost of every user over 30 or 90 days, on the
overview and the usage page) add up a row of ``usage_rollup_user_daily`` per user, day and
model: tens of thousands for a busy month. Days that have ended hardly change, so their part
is computed once and kept ``ttl`` seconds; today's part is always read afresh. What can still
change an ended day (a usage row replayed from the spool after an outage) shows within
``ttl``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")
DEFAULT_TTL_SECONDS = 60.0


class ClosedDaysCache:
    """A small map of computed values with an age limit (least recently stored goes first)."""

    def __init__(
        self,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        max_entries: int = 32,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl_seconds
        self._max = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._values: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        """The value kept for ``key``, or ``compute()``'s (kept from now on)."""
        now = self._clock()
        with self._lock:
            kept = self._values.get(key)
            if kept is not None and kept[0] > now:
                value: T = kept[1]
                return value
        value = compute()  # outside the lock: two requests may both compute; both are right
        with self._lock:
            self._values[key] = (now + self._ttl, value)
            self._values.move_to_end(key)
            while len(self._values) > self._max:
                self._values.popitem(last=False)
        return value
