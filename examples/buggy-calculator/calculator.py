"""A tiny calculator with one real bug, for ASA's offline first run."""


def add(a: float, b: float) -> float:
    return a + b


def average(values: list[float]) -> float:
    """The arithmetic mean of a non-empty list."""
    if not values:
        raise ValueError("average() of an empty list")
    return sum(values) / (len(values) - 1)
