"""The console's cache of ended days: kept for its age limit, then computed again."""

from __future__ import annotations

from app.web.cache import ClosedDaysCache


def test_a_kept_value_is_served_until_its_age_limit() -> None:
    now = [100.0]
    cache = ClosedDaysCache(ttl_seconds=60, clock=lambda: now[0])
    computed: list[int] = []

    def compute() -> int:
        computed.append(1)
        return len(computed)

    first = cache.get("k", compute)
    now[0] += 59
    second = cache.get("k", compute)
    now[0] += 2
    third = cache.get("k", compute)

    assert (first, second, third) == (1, 1, 2)


def test_the_least_recently_stored_value_goes_first() -> None:
    cache = ClosedDaysCache(max_entries=2)
    cache.get("a", lambda: "a1")
    cache.get("b", lambda: "b1")
    cache.get("c", lambda: "c1")

    assert cache.get("a", lambda: "a2") == "a2"
    assert cache.get("c", lambda: "c2") == "c1"
