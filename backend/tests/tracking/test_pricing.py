"""PriceBook against genai-prices itself: the fast per-model rates never change a cost."""

from __future__ import annotations

from decimal import Decimal

import pytest
from genai_prices import Usage, calc_price, data_snapshot

from app.tracking.pricing import PriceBook, TokenUsage

USAGES = (
    TokenUsage(prompt_tokens=1234, completion_tokens=567, cached_tokens=200, reasoning_tokens=100),
    TokenUsage(prompt_tokens=10, completion_tokens=0),
    TokenUsage(prompt_tokens=0, completion_tokens=99_999, reasoning_tokens=5_000),
    TokenUsage(prompt_tokens=300_000, completion_tokens=10, cached_tokens=299_999),
    TokenUsage(prompt_tokens=1_500_000, completion_tokens=3, cached_tokens=7),
)


def _openai_model_ids() -> list[str]:
    snapshot = data_snapshot.get_snapshot()
    (provider,) = [p for p in snapshot.providers if p.id == "openai"]
    return [model.id for model in provider.models]


def _genai_prices(model: str, usage: TokenUsage) -> Decimal | None:
    try:
        calc = calc_price(
            Usage(
                input_tokens=usage.prompt_tokens,
                cache_read_tokens=usage.cached_tokens,
                output_tokens=usage.completion_tokens,
            ),
            model_ref=model,
            provider_id="openai",
        )
    except LookupError:
        return None
    return Decimal(calc.total_price)


def test_every_openai_model_costs_exactly_what_genai_prices_says() -> None:
    book = PriceBook()
    checked = 0
    for model in _openai_model_ids():
        for usage in USAGES:
            expected = _genai_prices(model, usage)
            if expected is None:
                continue  # ids the snapshot lists but cannot resolve by name (fine-tune prefixes)
            quote = book.quote(model, usage)
            assert (quote.cost_usd, quote.status) == (expected, "priced"), (model, usage)
            checked += 1
    assert checked > 300


def test_plain_rates_serve_gpt_4o_and_tiered_prices_go_through_genai_prices() -> None:
    book = PriceBook()
    book.quote("gpt-4o", USAGES[0])
    linear = [rates for _, rates in book._linear.values()]
    assert linear and linear[0] is not None
    # Every snapshot price with a tier (the rate depends on the prompt size) keeps the slow,
    # exact path: the probes refuse to reduce it to three rates.
    for model in _openai_model_ids():
        if _genai_prices(model, USAGES[1]) is not None:
            book.quote(model, USAGES[4])
    assert any(rates is None for _, rates in book._linear.values())


def test_cached_and_reasoning_tokens_on_gpt_4o_by_hand() -> None:
    # gpt-4o: $2.50 input, $1.25 cached input, $10 output per million tokens; reasoning tokens
    # are part of completion tokens and priced once, at the output rate.
    quote = PriceBook().quote("gpt-4o", USAGES[0])
    expected = (Decimal(1034) * Decimal("2.5") + 200 * Decimal("1.25") + 567 * 10) / 1_000_000
    assert quote.cost_usd == expected


@pytest.mark.parametrize("model", ["no-such-model-xyz", "ft:gpt-4o"])
def test_unknown_model_is_unpriced_not_free(model: str) -> None:
    quote = PriceBook().quote(model, USAGES[0])
    assert (quote.cost_usd, quote.status, quote.source) == (Decimal(0), "unpriced", "none")
