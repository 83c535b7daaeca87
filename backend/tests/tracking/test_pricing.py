"""PriceBook: every provider genai-prices knows, priced exactly, tiers included.

The table's expected costs are computed by hand from the per-million-token prices written next
to them (as published by each provider and carried by genai-prices' bundled snapshot), not by
asking genai-prices; the sweep checks the fast per-model rates against genai-prices itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from genai_prices import data_snapshot

from app.tracking.pricing import PriceBook, TieredPrice, TokenUsage, _gp_usage

USAGES = (
    TokenUsage(prompt_tokens=1234, completion_tokens=567, cached_tokens=200, reasoning_tokens=100),
    TokenUsage(prompt_tokens=10, completion_tokens=0),
    TokenUsage(prompt_tokens=0, completion_tokens=99_999, reasoning_tokens=5_000),
    TokenUsage(prompt_tokens=300_000, completion_tokens=10, cached_tokens=299_999),
    TokenUsage(prompt_tokens=200_001, completion_tokens=3, cached_tokens=7),
)
GATEWAY = "https://llm-gateway.internal.example/v1"  # an OpenAI-compatible gateway: no provider
PEAK = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)  # DeepSeek prices by time of day (UTC)
OFF_PEAK = datetime(2026, 11, 2, 20, 0, tzinfo=UTC)
M = Decimal(1_000_000)


def per_million(
    usage: TokenUsage,
    *,
    input_mtok: str,
    output_mtok: str,
    cache_read_mtok: str | None = None,
) -> Decimal:
    """Cost by hand: uncached input, cached input (cache-read rate) and output, per MTok."""
    cached_rate = Decimal(cache_read_mtok if cache_read_mtok is not None else input_mtok)
    uncached = usage.prompt_tokens - usage.cached_tokens
    return (
        uncached * Decimal(input_mtok)
        + usage.cached_tokens * cached_rate
        + usage.completion_tokens * Decimal(output_mtok)
    ) / M


@dataclass(frozen=True)
class Case:
    id: str
    model: str
    provider: str  # the resolved gen_ai.provider.name
    usage: TokenUsage
    expected: Decimal
    at: datetime = PEAK


CASES = [
    Case(
        "openai-gpt-4o-cached",  # $2.50 input, $1.25 cached input, $10 output
        "gpt-4o",
        "openai",
        TokenUsage(prompt_tokens=2000, completion_tokens=300, cached_tokens=1024),
        (976 * Decimal("2.50") + 1024 * Decimal("1.25") + 300 * Decimal(10)) / M,
    ),
    Case(
        "openai-embedding",  # $0.02 input, nothing else
        "text-embedding-3-small",
        "openai",
        TokenUsage(prompt_tokens=8000),
        8000 * Decimal("0.02") / M,
    ),
    Case(
        "anthropic-sonnet-4.5",  # $3 input, $0.30 cache read, $15 output up to 200k
        "claude-sonnet-4-5",
        "anthropic",
        TokenUsage(prompt_tokens=12_000, completion_tokens=800, cached_tokens=10_000),
        (2000 * Decimal(3) + 10_000 * Decimal("0.30") + 800 * Decimal(15)) / M,
    ),
    Case(
        "anthropic-sonnet-4.5-long-context",  # above 200k prompt tokens: $6, $0.60, $22.50
        "claude-sonnet-4-5",
        "anthropic",
        TokenUsage(prompt_tokens=250_000, completion_tokens=2000, cached_tokens=50_000),
        (200_000 * Decimal(6) + 50_000 * Decimal("0.60") + 2000 * Decimal("22.50")) / M,
    ),
    Case(
        "google-gemini-2.5-pro",  # $1.25 input, $0.125 cache read, $10 output up to 200k
        "gemini-2.5-pro",
        "gcp.gemini",
        TokenUsage(prompt_tokens=200_000, completion_tokens=1000, reasoning_tokens=600),
        (200_000 * Decimal("1.25") + 1000 * Decimal(10)) / M,
    ),
    Case(
        "google-gemini-2.5-pro-long-context",  # above 200k: $2.50 input, $0.25 cached, $15 out
        "gemini-2.5-pro",
        "gcp.gemini",
        TokenUsage(prompt_tokens=200_001, completion_tokens=1000, cached_tokens=100_000),
        (100_001 * Decimal("2.50") + 100_000 * Decimal("0.25") + 1000 * Decimal(15)) / M,
    ),
    Case(
        "mistral-large",  # $2 input, $6 output (cached tokens billed as input: no cache rate)
        "mistral-large-latest",
        "mistral_ai",
        TokenUsage(prompt_tokens=5000, completion_tokens=700, cached_tokens=1000),
        (5000 * Decimal(2) + 700 * Decimal(6)) / M,
    ),
    Case(
        "deepseek-chat-cached-peak",  # 00:30-16:30 UTC: $0.27 input, $0.07 cached, $1.10 output
        "deepseek-chat",
        "deepseek",
        TokenUsage(prompt_tokens=10_000, completion_tokens=1000, cached_tokens=6000),
        (4000 * Decimal("0.27") + 6000 * Decimal("0.07") + 1000 * Decimal("1.10")) / M,
    ),
    Case(
        "deepseek-chat-cached-off-peak",  # otherwise: $0.135, $0.035 cached, $0.55 output
        "deepseek-chat",
        "deepseek",
        TokenUsage(prompt_tokens=10_000, completion_tokens=1000, cached_tokens=6000),
        (4000 * Decimal("0.135") + 6000 * Decimal("0.035") + 1000 * Decimal("0.55")) / M,
        at=OFF_PEAK,
    ),
    Case(
        "xai-grok-4",  # $3 input, $0.75 cached, $15 output
        "grok-4",
        "x_ai",
        TokenUsage(prompt_tokens=3000, completion_tokens=100, cached_tokens=1000),
        (2000 * Decimal(3) + 1000 * Decimal("0.75") + 100 * Decimal(15)) / M,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_gateway_call_is_priced_by_hand_at_its_providers_rates(case: Case) -> None:
    book = PriceBook()

    quote = book.quote(case.model, case.usage, endpoint=GATEWAY, at=case.at)

    assert (quote.cost_usd, quote.status, quote.source) == (
        case.expected,
        "priced",
        "genai-prices",
    )
    assert book.resolve(case.model, None, GATEWAY).provider == case.provider


def test_the_long_context_tier_starts_above_200k_prompt_tokens() -> None:
    book = PriceBook()
    at, above = TokenUsage(200_000, 100), TokenUsage(200_001, 100)

    assert (
        book.quote("claude-sonnet-4-5", at).cost_usd
        == (200_000 * Decimal(3) + 100 * Decimal(15)) / M
    )
    assert (
        book.quote("claude-sonnet-4-5", above).cost_usd
        == (200_001 * Decimal(6) + 100 * Decimal("22.50")) / M
    )
    tiered = [v[2] for v in book._rates.values() if isinstance(v[2], TieredPrice)]
    assert tiered and tiered[0].tiers[0][0] == 200_000  # served by the fast rates


@pytest.mark.parametrize(
    ("model", "provider", "endpoint", "name", "expected"),
    [
        # An explicit provider (call, client or LLM_PROVIDER) wins.
        ("claude-sonnet-4-5", "anthropic", GATEWAY, "anthropic", "3"),
        ("gemini-2.5-pro", "google", None, "gcp.gemini", "1.25"),  # genai-prices' id accepted
        ("mistral-large-latest", "mistral_ai", None, "mistral_ai", "2"),
        # The endpoint URL, by genai-prices' API URL patterns.
        ("deepseek-chat", None, "https://api.deepseek.com/v1", "deepseek", "0.27"),
        ("claude-sonnet-4-5", None, "https://api.anthropic.com/v1/", "anthropic", "3"),
        (
            "gemini-2.5-pro",
            None,
            "https://us-central1-aiplatform.googleapis.com/v1/x",
            "gcp.vertex_ai",
            "1.25",
        ),
        # OpenRouter's own catalogue uses prefixed names.
        ("anthropic/claude-sonnet-4", None, "https://openrouter.ai/api/v1", "openrouter", "3"),
        # A provider/model prefix, as LiteLLM-style gateways take it.
        ("anthropic/claude-sonnet-4-5", None, GATEWAY, "anthropic", "3"),
        ("mistral/mistral-large-latest", None, GATEWAY, "mistral_ai", "2"),
        # The model's name.
        ("deepseek-chat", None, GATEWAY, "deepseek", "0.27"),
        ("gpt-4o-mini", None, None, "openai", "0.15"),
        # Nothing says: the API the client speaks, whose catalogue has this one.
        ("text-embedding-3-large", None, GATEWAY, "openai", "0.13"),
    ],
)
def test_the_provider_is_found_from_setting_endpoint_prefix_or_name(
    model: str, provider: str | None, endpoint: str | None, name: str, expected: str
) -> None:
    book = PriceBook()

    quote = book.quote(
        model, TokenUsage(prompt_tokens=100_000), provider=provider, endpoint=endpoint, at=PEAK
    )

    assert book.resolve(model, provider, endpoint).provider == name
    # ``expected`` is the input price per million tokens; the prompt is 100k tokens.
    assert (quote.cost_usd, quote.status) == (Decimal(expected) / 10, "priced")


@pytest.mark.parametrize(
    ("model", "provider"),
    [("no-such-model-xyz", None), ("ft:gpt-4o", None), ("claude-sonnet-4-5", "vllm")],
)
def test_an_unknown_model_or_provider_is_unpriced_not_free(model: str, provider: str) -> None:
    book = PriceBook()
    quote = book.quote(model, USAGES[0], provider=provider)
    assert (quote.cost_usd, quote.status, quote.source) == (Decimal(0), "unpriced", "none")
    assert book.unit_price(model, provider) is None


def test_an_override_prices_a_model_under_its_prefixed_name_too() -> None:
    book = PriceBook({"my-llama": {"input_mtok": Decimal("0.2"), "output_mtok": Decimal("0.4")}})

    quote = book.quote("my-llama", TokenUsage(1000, 500), provider="vllm")

    assert (quote.cost_usd, quote.source) == (Decimal("0.0004"), "override")


def test_the_budget_reserves_a_tiered_model_at_its_top_tier() -> None:
    price = PriceBook().unit_price("gemini-2.5-pro")
    assert price is not None
    assert (price.input_mtok, price.output_mtok) == (Decimal("2.5"), Decimal(15))


def test_reasoning_billed_apart_is_priced_at_its_own_rate() -> None:
    # OpenRouter's perplexity/sonar-deep-research: $2 input, $8 output, $3 reasoning output.
    quote = PriceBook().quote(
        "perplexity/sonar-deep-research",
        TokenUsage(prompt_tokens=1000, completion_tokens=1000, reasoning_tokens=400),
        provider="openrouter",
    )
    assert quote.cost_usd == (1000 * Decimal(2) + 600 * Decimal(8) + 400 * Decimal(3)) / M


def test_every_model_of_every_provider_costs_exactly_what_genai_prices_says() -> None:
    """The fast rates (plain or tiered) never change a cost, for any snapshot model."""
    snapshot = data_snapshot.get_snapshot()
    book = PriceBook()
    checked = 0
    for provider in snapshot.providers:
        for model in provider.models:
            for usage in USAGES:
                try:
                    expected = snapshot.calc(
                        _gp_usage(usage), model.id, provider.id, None, PEAK
                    ).total_price
                except LookupError:
                    continue  # ids the snapshot lists but cannot resolve by name
                quote = book.quote(model.id, usage, provider=provider.id, at=PEAK)
                assert (quote.cost_usd, quote.status) == (expected, "priced"), (
                    provider.id,
                    model.id,
                    usage,
                )
                checked += 1
    assert checked > 5000
    fast = [rates for _, _, rates, _ in book._rates.values() if rates is not None]
    assert len(fast) > 0.9 * len(book._rates)
    assert any(isinstance(rates, TieredPrice) for rates in fast)


SERVICE_TIERS = ("flex", "priority", "default", "fast")


def test_every_service_tier_price_costs_exactly_what_genai_prices_says() -> None:
    """A call in a service tier (the response's ``service_tier``) is priced with genai-prices'
    price for that tier, for every model that has one, and the tier is named in provenance."""
    snapshot = data_snapshot.get_snapshot()
    book = PriceBook()
    cheaper = checked = 0
    for provider in snapshot.providers:
        for model in provider.models:
            tiers = {
                v.when["service_tier"]
                for v in model.price_variants or ()
                if set(v.when) == {"service_tier"}
            }
            for tier in sorted(tiers & set(SERVICE_TIERS)):
                for usage in USAGES:
                    try:
                        exact = snapshot.calc(
                            _gp_usage(usage),
                            model.id,
                            provider.id,
                            None,
                            PEAK,
                            price_context={"service_tier": tier},
                        ).total_price
                        standard = snapshot.calc(
                            _gp_usage(usage), model.id, provider.id, None, PEAK
                        ).total_price
                    except LookupError:
                        continue
                    quote = book.quote(
                        model.id, usage, provider=provider.id, at=PEAK, service_tier=tier
                    )
                    assert quote.cost_usd == exact, (provider.id, model.id, tier, usage)
                    assert quote.tier is not None and f"service_tier={tier}" in quote.tier
                    cheaper += tier == "flex" and exact < standard
                    checked += 1
    assert checked > 100
    assert cheaper > 10  # flex really is priced apart from the standard price


def test_a_service_tier_the_model_has_no_price_for_is_priced_at_the_standard_price() -> None:
    book = PriceBook()
    usage = TokenUsage(1000, 100)
    plain = book.quote("claude-sonnet-4-5", usage)
    tiered = book.quote("claude-sonnet-4-5", usage, service_tier="flex")
    assert (tiered.cost_usd, tiered.tier) == (plain.cost_usd, None)
