"""The recompute's integer pricing (``PriceBook.terms``) against the per-row ``quote``: the same
cost in pico-dollars, status and provenance on many random rows, for models of many providers,
tiered (long-context) prices, cached and reasoning tokens, service tiers, dated prices, and
overrides with more decimals than a pico-dollar per token holds."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from app.core.money import usd_to_pico
from app.tracking.pricing import UNPRICED_TERMS, PriceBook, TokenUsage

MODELS = (
    "gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-5", "gpt-5-mini", "o3", "o3-mini", "o1",
    "claude-sonnet-4-5", "claude-opus-4-1", "claude-3-5-haiku-latest", "gemini-2.5-pro",
    "gemini-2.5-flash", "gemini-1.5-pro", "mistral-large-latest", "deepseek-chat",
    "deepseek-reasoner", "grok-4", "command-r-plus", "my-llama", "odd-rates", "no-such-model",
)  # fmt: skip
OVERRIDES = {
    "my-llama": {"input_mtok": Decimal("0.20"), "output_mtok": Decimal("0.40")},
    # More decimals than a pico-dollar per token: the cost is rounded once, half-even.
    "odd-rates": {
        "input_mtok": Decimal("0.1234567"),
        "output_mtok": Decimal("1.0000005"),
        "cache_read_mtok": Decimal("0.00000025"),
    },
}
TIER_EDGES = (128_000, 200_000, 272_000)
NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)


def random_usage(rng: random.Random) -> TokenUsage:
    shape = rng.random()
    if shape < 0.3:  # at and around a long-context tier's start
        prompt = rng.choice(TIER_EDGES) + rng.choice((-1, 0, 1, 2, 5000))
    elif shape < 0.5:
        prompt = rng.randint(200_001, 2_000_000)
    else:
        prompt = rng.randint(0, 150_000)
    completion = rng.randint(0, 40_000)
    cached = rng.choice((0, rng.randint(0, prompt)))
    reasoning = rng.choice((0, rng.randint(0, completion)))
    return TokenUsage(prompt, completion, cached, reasoning)


def expected(book: PriceBook, model: str, usage: TokenUsage, **kwargs: Any) -> tuple[Any, ...]:
    """What the recompute wrote per row before: ``quote``, its cost made pico-dollars."""
    quote = book.quote(model, usage, **kwargs)
    if quote.status == "unpriced":
        return (0, "unpriced", None, None, None)
    return (usd_to_pico(quote.cost_usd), quote.status, quote.ref, quote.entry, quote.tier)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_integer_terms_price_every_row_as_quote_does(seed: int) -> None:
    rng = random.Random(seed)
    book = PriceBook(OVERRIDES)
    seen: Counter[str] = Counter()
    for _ in range(4000):
        model = rng.choice(MODELS)
        provider = rng.choice((None, book.resolve(model).provider))
        tier = rng.choice((None, None, "flex", "priority", "default", "scale"))
        at = NOW - timedelta(seconds=rng.randint(0, 2 * 365 * 86400))
        usage = random_usage(rng)
        estimated = rng.random() < 0.1
        kwargs: dict[str, Any] = {"provider": provider, "at": at, "service_tier": tier}

        terms = book.terms(model, **kwargs)
        want = expected(book, model, usage, estimated=estimated, **kwargs)
        if terms is None:  # only genai-prices' own calculation is exact: quoted per row
            seen["quoted"] += 1
            continue
        got = terms.price(*(usage.prompt_tokens, usage.completion_tokens), *(
            usage.cached_tokens, usage.reasoning_tokens), estimated)  # fmt: skip
        assert got == want, (model, provider, tier, at, usage, estimated)
        seen["compared"] += 1
        seen["unpriced"] += got[1] == "unpriced"
        seen["override"] += terms.source == "override"
        seen["long-context tier"] += "input>" in (got[4] or "")
        seen["service tier"] += "service_tier=" in (got[4] or "")
        seen["cached"] += usage.cached_tokens > 0 and got[0] > 0
        seen["reasoning"] += usage.reasoning_tokens > 0 and got[0] > 0
        seen["dated"] += not terms.timeless
        seen["rounded"] += terms.base is not None and terms.base.places > 0
    # The sweep reached every kind of price it is for.
    kinds = ("unpriced", "override", "long-context tier", "service tier", "cached", "reasoning")
    for kind in (*kinds, "dated", "rounded"):
        assert seen[kind] > 20, (kind, seen)
    assert seen["compared"] > 10 * seen["quoted"], seen


def test_counts_too_large_for_the_integer_rates_are_left_to_quote() -> None:
    book = PriceBook(OVERRIDES)
    terms = book.terms("odd-rates")
    assert terms is not None
    assert terms.price(10**30, 1, 0, 0, False) is None
    big = 10**15
    got = terms.price(big, big, big // 3, 0, False)
    usage = TokenUsage(big, big, big // 3)
    assert got == expected(book, "odd-rates", usage)


def test_a_model_no_source_knows_has_the_unpriced_terms() -> None:
    book = PriceBook()
    assert book.terms("no-such-model", provider="openai") is UNPRICED_TERMS
    assert UNPRICED_TERMS.price(1000, 10, 0, 0, False) == (0, "unpriced", None, None, None)
