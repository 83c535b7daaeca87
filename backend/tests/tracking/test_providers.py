"""Every provider priced: calls through the real SDK to the simulator standing in for an
OpenAI-compatible gateway that serves Claude, Gemini, Mistral, DeepSeek and OpenAI models.

The simulator's URL (127.0.0.1) identifies no provider, as a company gateway would not: the
provider comes from the model's name, a ``provider/model`` prefix or an explicit setting. Costs
are computed by hand from the per-million prices written in each case.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import time
from decimal import Decimal
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer
from sqlalchemy import select

from app.core.errors import BudgetExceededError
from app.core.runtime import Runtime
from app.models import LLMUsage
from app.simulator.config import ScriptRule
from app.simulator.server import SimulatorServer
from app.tracking.llm_client import AsyncLLMClient, LLMClient

M = Decimal(1_000_000)


def script_usage(sim: SimulatorServer, model: str, **usage: int) -> None:
    rule = {"match_model": model, "reply": {"content": "ok", "usage": usage}}
    sim.state.add_scripts([ScriptRule.model_validate(rule)])


def rows(runtime: Runtime) -> list[LLMUsage]:
    with runtime.session_factory() as session:
        return list(session.scalars(select(LLMUsage).order_by(LLMUsage.timestamp)))


def deepseek_chat(row: LLMUsage) -> Decimal:
    """DeepSeek prices by time of day: 00:30-16:30 UTC $0.27 input, $0.07 cached, $1.10
    output; otherwise half ($0.135, $0.035, $0.55). The row's time says which applied."""
    peak = time(0, 30) <= row.timestamp.time() < time(16, 30)
    rates = ("0.27", "0.07", "1.10") if peak else ("0.135", "0.035", "0.55")
    uncached, cached, output = (Decimal(r) for r in rates)
    return (4000 * uncached + 6000 * cached + 1000 * output) / M


GATEWAY_CALLS: list[tuple[str, dict[str, int], str, Callable[[LLMUsage], Decimal]]] = [
    (
        "gpt-4o",  # $2.50 input, $1.25 cached, $10 output
        {"prompt_tokens": 2000, "completion_tokens": 300, "cached_tokens": 1024},
        "openai",
        lambda _: (976 * Decimal("2.50") + 1024 * Decimal("1.25") + 300 * Decimal(10)) / M,
    ),
    (
        "claude-sonnet-4-5",  # $3 input, $0.30 cache read, $15 output (prompts up to 200k)
        {"prompt_tokens": 12_000, "completion_tokens": 800, "cached_tokens": 10_000},
        "anthropic",
        lambda _: (2000 * Decimal(3) + 10_000 * Decimal("0.30") + 800 * Decimal(15)) / M,
    ),
    (
        "gemini-2.5-pro",  # prompts above 200k: $2.50 input, $0.25 cached, $15 output
        {"prompt_tokens": 250_000, "completion_tokens": 1000, "cached_tokens": 50_000},
        "gcp.gemini",
        lambda _: (200_000 * Decimal("2.50") + 50_000 * Decimal("0.25") + 1000 * Decimal(15)) / M,
    ),
    (
        "mistral-large-latest",  # $2 input, $6 output
        {"prompt_tokens": 5000, "completion_tokens": 700},
        "mistral_ai",
        lambda _: (5000 * Decimal(2) + 700 * Decimal(6)) / M,
    ),
    (
        "deepseek-chat",
        {"prompt_tokens": 10_000, "completion_tokens": 1000, "cached_tokens": 6000},
        "deepseek",
        deepseek_chat,
    ),
]


def test_a_gateway_serving_five_providers_prices_each_call(
    runtime: Runtime, sim: SimulatorServer, tracer: Tracer, span_exporter: InMemorySpanExporter
) -> None:
    for model, usage, _, _ in GATEWAY_CALLS:
        script_usage(sim, model, **usage)
    client = LLMClient(task_id="t-gateway", runtime=runtime, tracer=tracer)

    for model, _, _, _ in GATEWAY_CALLS:
        client.chat_completion(messages=[{"role": "user", "content": "hi"}], model=model)

    by_model = {row.model: row for row in rows(runtime)}
    spans = {s.attributes["gen_ai.request.model"]: s for s in span_exporter.get_finished_spans()}  # type: ignore[index]
    for model, _, provider, expected in GATEWAY_CALLS:
        row = by_model[model]
        assert (row.provider, row.cost_status) == (provider, "priced"), model
        assert row.cost_usd == expected(row), model
        attrs = spans[model].attributes or {}
        assert attrs["gen_ai.provider.name"] == provider
        assert attrs["llm.cost_usd"] == pytest.approx(float(expected(row)))


def test_a_provider_prefix_names_the_provider_and_the_model_is_sent_as_given(
    runtime: Runtime, sim: SimulatorServer
) -> None:
    script_usage(sim, "anthropic/claude-sonnet-4-5", prompt_tokens=1000, completion_tokens=100)

    response = LLMClient(runtime=runtime).chat_completion(
        messages=[{"role": "user", "content": "hi"}], model="anthropic/claude-sonnet-4-5"
    )

    assert response.model == "anthropic/claude-sonnet-4-5"  # type: ignore[union-attr]
    (row,) = rows(runtime)
    assert (row.provider, row.model) == ("anthropic", "anthropic/claude-sonnet-4-5")
    assert row.cost_usd == (1000 * Decimal(3) + 100 * Decimal(15)) / M


def test_llm_provider_setting_names_the_provider_of_every_call(
    runtime_factory: Callable[..., Runtime], sim: SimulatorServer
) -> None:
    runtime = runtime_factory(llm_provider="openrouter")
    # OpenRouter's catalogue: anthropic/claude-sonnet-4 at $3 input, $15 output.
    script_usage(sim, "claude", prompt_tokens=1000, completion_tokens=100)

    LLMClient(runtime=runtime).chat_completion(
        messages=[{"role": "user", "content": "hi"}], model="anthropic/claude-sonnet-4"
    )

    (row,) = rows(runtime)
    assert (row.provider, row.cost_status) == ("openrouter", "priced")
    assert row.cost_usd == (1000 * Decimal(3) + 100 * Decimal(15)) / M


def test_a_per_call_provider_wins_over_the_client_and_is_not_sent(
    runtime: Runtime, sim: SimulatorServer
) -> None:
    client = LLMClient(runtime=runtime, provider="vllm")

    client.chat_completion(messages=[{"role": "user", "content": "a"}], model="gpt-4o-mini")
    client.chat_completion(
        messages=[{"role": "user", "content": "b"}], model="gpt-4o-mini", provider="openai"
    )

    first, second = rows(runtime)
    # A provider genai-prices does not know is recorded as named, and unpriced (not $0 priced).
    assert (first.provider, first.cost_status, first.cost_pico_usd) == ("vllm", "unpriced", 0)
    assert (second.provider, second.cost_status) == ("openai", "priced")
    assert second.cost_pico_usd > 0


def test_an_unknown_model_is_unpriced_never_a_silent_zero(
    runtime: Runtime, sim: SimulatorServer
) -> None:
    LLMClient(runtime=runtime).chat_completion(
        messages=[{"role": "user", "content": "hi"}], model="llama-3.3-70b-instruct"
    )

    (row,) = rows(runtime)
    assert (row.cost_status, row.cost_pico_usd, row.provider) == ("unpriced", 0, "openai")
    assert row.prompt_tokens > 0


async def test_the_async_client_resolves_the_provider_alike(
    runtime: Runtime, sim: SimulatorServer
) -> None:
    script_usage(sim, "mistral-large", prompt_tokens=5000, completion_tokens=700)

    await AsyncLLMClient(runtime=runtime).chat_completion(
        messages=[{"role": "user", "content": "hi"}], model="mistral-large-latest"
    )

    (row,) = rows(runtime)
    assert row.provider == "mistral_ai"
    assert row.cost_usd == (5000 * Decimal(2) + 700 * Decimal(6)) / M


def test_the_budget_reserves_at_the_providers_price(
    runtime_factory: Callable[..., Runtime], sim: SimulatorServer
) -> None:
    runtime = runtime_factory(budget_task_max_usd=Decimal("0.001"))
    # claude-sonnet-4-5, reserved at its top tier: 100 output tokens alone are $0.00225.
    kwargs: dict[str, Any] = {"max_tokens": 100}
    with pytest.raises(BudgetExceededError):
        LLMClient(task_id="t-claude", runtime=runtime).chat_completion(
            messages=[{"role": "user", "content": "hi"}], model="claude-sonnet-4-5", **kwargs
        )
    (row,) = rows(runtime)
    assert (row.status, row.provider) == ("blocked", "anthropic")
    assert sim.state.stats()["requests"] == 0
