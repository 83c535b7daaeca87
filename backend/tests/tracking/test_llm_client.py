"""LLMClient against the simulator over real HTTP, on SQLite and PostgreSQL.

Costs are checked against figures computed by hand from the published per-MTok prices.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import openai
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Tracer
from sqlalchemy import func, select

from app.core.runtime import Runtime
from app.models import LLMUsage, UsageRollupDaily
from app.simulator.config import ScriptRule
from app.simulator.server import SimulatorServer
from app.tracking.llm_client import AsyncLLMClient, InvalidLLMRequest, LLMClient

MESSAGES = [{"role": "user", "content": "Say hello"}]


def script(sim: SimulatorServer, **rule: Any) -> None:
    sim.state.add_scripts([ScriptRule.model_validate(rule)])


def rows(runtime: Runtime) -> list[LLMUsage]:
    with runtime.session_factory() as session:
        return list(session.scalars(select(LLMUsage).order_by(LLMUsage.timestamp)))


def only_row(runtime: Runtime) -> LLMUsage:
    found = rows(runtime)
    assert len(found) == 1, found
    return found[0]


def test_gpt4o_call_with_cached_tokens_is_priced_at_the_cache_rate(
    runtime: Runtime, sim: SimulatorServer
) -> None:
    script(
        sim,
        match_user="cached",
        reply={
            "content": "ok",
            "usage": {"prompt_tokens": 2000, "completion_tokens": 300, "cached_tokens": 1024},
        },
    )
    client = LLMClient(task_id="task-1", user_id="alice", agent="FixAgent", runtime=runtime)

    response = client.chat_completion(
        messages=[{"role": "user", "content": "cached please"}], model="gpt-4o", temperature=0.7
    )

    assert isinstance(response, openai.types.chat.ChatCompletion)
    row = only_row(runtime)
    # (2000-1024) x $2.50 + 1024 x $1.25 + 300 x $10.00, per million tokens
    assert row.cost_usd == Decimal("0.00672")
    assert (row.prompt_tokens, row.cached_tokens, row.completion_tokens) == (2000, 1024, 300)
    assert (row.task_id, row.user_id, row.agent, row.status) == (
        "task-1",
        "alice",
        "FixAgent",
        "success",
    )
    assert row.cost_status == "priced"
    assert row.total_tokens == 2300


def test_reasoning_tokens_are_billed_once_within_completion(
    runtime: Runtime, sim: SimulatorServer
) -> None:
    script(
        sim,
        match_model="o3",
        reply={
            "content": "thought",
            "usage": {"prompt_tokens": 1000, "completion_tokens": 800, "reasoning_tokens": 500},
        },
    )

    LLMClient(runtime=runtime).chat_completion(messages=MESSAGES, model="o3")

    row = only_row(runtime)
    # 1000 x $2 + 800 x $8 (reasoning is part of the 800), per million tokens
    assert row.cost_usd == Decimal("0.0084")
    assert row.reasoning_tokens == 500


def test_override_price_wins_for_a_self_hosted_model(
    runtime_factory: Callable[..., Runtime], sim: SimulatorServer
) -> None:
    overrides = {"my-llama": {"input_mtok": "0.2", "output_mtok": "0.4", "cache_read_mtok": "0.1"}}
    runtime = runtime_factory(price_overrides=overrides)
    script(
        sim,
        match_model="my-llama",
        reply={
            "content": "x",
            "usage": {"prompt_tokens": 1000, "completion_tokens": 500, "cached_tokens": 200},
        },
    )

    LLMClient(runtime=runtime).chat_completion(messages=MESSAGES, model="my-llama")

    # 800 x $0.2 + 200 x $0.1 + 500 x $0.4, per million tokens
    assert only_row(runtime).cost_usd == Decimal("0.00038")


def test_unknown_model_is_recorded_unpriced_with_one_warning(
    runtime: Runtime, sim: SimulatorServer, caplog: pytest.LogCaptureFixture
) -> None:
    before = counter_value("llm_unpriced_calls_total", model="mystery-model-x")
    client = LLMClient(runtime=runtime)

    client.chat_completion(messages=MESSAGES, model="mystery-model-x")
    client.chat_completion(messages=MESSAGES, model="mystery-model-x")

    found = rows(runtime)
    assert [r.cost_status for r in found] == ["unpriced", "unpriced"]
    assert all(r.cost_pico_usd == 0 and r.prompt_tokens > 0 for r in found)
    warnings = [r for r in caplog.records if "mystery-model-x" in r.getMessage()]
    assert len(warnings) == 1
    assert counter_value("llm_unpriced_calls_total", model="mystery-model-x") == before + 2


def test_streamed_call_is_recorded_when_the_stream_ends(
    runtime: Runtime, sim: SimulatorServer
) -> None:
    script(
        sim,
        match_user="stream",
        reply={
            "content": "one two three four five",
            "usage": {"prompt_tokens": 100, "completion_tokens": 50},
        },
    )

    stream = LLMClient(runtime=runtime).chat_completion(
        messages=[{"role": "user", "content": "stream it"}], model="gpt-4o-mini", stream=True
    )
    chunks = list(stream)

    assert any(c.usage is not None for c in chunks)  # usage chunk passed through
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "one two three four five"
    )
    row = only_row(runtime)
    # 100 x $0.15 + 50 x $0.60, per million tokens
    assert row.cost_usd == Decimal("0.000045")
    assert row.is_stream and not row.is_partial and row.status == "success"


def test_stream_closed_early_is_recorded_as_partial(runtime: Runtime, sim: SimulatorServer) -> None:
    script(sim, match_user="long", reply="word " * 200)
    stream = LLMClient(runtime=runtime).chat_completion(
        messages=[{"role": "user", "content": "long answer"}], model="gpt-4o-mini", stream=True
    )
    iterator = iter(stream)
    next(iterator)
    next(iterator)
    stream.close()

    row = only_row(runtime)
    assert row.is_partial and row.status == "success"
    assert row.cost_status == "estimated" and row.prompt_tokens > 0
    assert "stream_closed_early" in (row.flags or "")


def test_truncated_stream_is_an_error_row_and_reraised(
    runtime: Runtime, sim: SimulatorServer
) -> None:
    script(sim, match_user="cut", reply={"content": "word " * 50, "fault": "truncate"})
    stream = LLMClient(runtime=runtime).chat_completion(
        messages=[{"role": "user", "content": "cut me"}], model="gpt-4o-mini", stream=True
    )
    with pytest.raises(Exception) as raised:
        list(stream)

    row = only_row(runtime)
    assert row.status == "error" and row.error_type == type(raised.value).__name__


def test_provider_error_is_recorded_and_reraised_unchanged(
    runtime: Runtime, sim: SimulatorServer
) -> None:
    sim.state.schedule_fault("500")
    with pytest.raises(openai.InternalServerError):
        LLMClient(task_id="t-err", runtime=runtime).chat_completion(messages=MESSAGES)

    row = only_row(runtime)
    assert (row.status, row.error_type, row.cost_pico_usd) == ("error", "InternalServerError", 0)
    assert row.error_message


def test_sdk_retries_are_one_row_with_their_attempts_counted(
    runtime_factory: Callable[..., Runtime], sim: SimulatorServer
) -> None:
    runtime = runtime_factory(openai_max_retries=2)
    sim.state.schedule_fault("500", times=2)

    LLMClient(runtime=runtime).chat_completion(messages=MESSAGES, model="gpt-4o-mini")

    row = only_row(runtime)
    assert (row.status, row.attempts) == ("success", 3)
    assert sim.state.stats()["requests"] == 3


def test_error_message_never_holds_the_api_key(runtime: Runtime, sim: SimulatorServer) -> None:
    sim.state.schedule_fault("400")
    with pytest.raises(openai.BadRequestError):
        LLMClient(runtime=runtime).chat_completion(messages=MESSAGES)
    row = only_row(runtime)
    assert "sk-test-canary-key-0000" not in (row.error_message or "")


@pytest.mark.parametrize("bad", ["hello", None, 42, [], ["not a message"]])
def test_malformed_messages_are_refused_before_any_call(
    runtime: Runtime, sim: SimulatorServer, bad: Any
) -> None:
    with pytest.raises(InvalidLLMRequest):
        LLMClient(runtime=runtime).chat_completion(messages=bad)
    assert rows(runtime) == []
    assert sim.state.stats()["requests"] == 0


@pytest.mark.parametrize(
    ("fault", "flag"), [("negative_usage", "negative_tokens"), ("absurd_usage", "absurd_tokens")]
)
def test_impossible_token_counts_give_a_flagged_row(
    runtime: Runtime, sim: SimulatorServer, fault: str, flag: str
) -> None:
    sim.state.schedule_fault(fault)  # type: ignore[arg-type]
    LLMClient(runtime=runtime).chat_completion(messages=MESSAGES, model="gpt-4o-mini")
    row = only_row(runtime)
    assert flag in (row.flags or "")
    assert row.prompt_tokens >= 0 and row.completion_tokens >= 0 and row.cost_pico_usd >= 0
    assert row.prompt_tokens < 10**9


def test_tool_calls_and_n_pass_through_untouched(runtime: Runtime, sim: SimulatorServer) -> None:
    script(
        sim,
        match_user="weather",
        reply={"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]},
    )
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    ]

    response = LLMClient(runtime=runtime).chat_completion(
        messages=[{"role": "user", "content": "weather?"}],
        model="gpt-4o",
        tools=tools,
        n=2,
        extra_headers={"x-test": "1"},
    )

    assert isinstance(response, openai.types.chat.ChatCompletion)
    assert len(response.choices) == 2
    call = response.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert only_row(runtime).finish_reason == "tool_calls,tool_calls"


def test_span_carries_seed_and_genai_attributes(
    runtime: Runtime, sim: SimulatorServer, tracer: Tracer, span_exporter: InMemorySpanExporter
) -> None:
    script(
        sim,
        match_user="span",
        reply={"content": "ok", "usage": {"prompt_tokens": 10, "completion_tokens": 5}},
    )
    LLMClient(
        task_id="t-span", user_id="u-span", agent="CodeAgent", runtime=runtime, tracer=tracer
    ).chat_completion(
        messages=[{"role": "user", "content": "span test secret prompt"}], model="gpt-4o-mini"
    )

    (span,) = span_exporter.get_finished_spans()
    attrs = dict(span.attributes or {})
    assert span.name == "chat gpt-4o-mini" and span.kind == SpanKind.CLIENT
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert "gen_ai.system" not in attrs  # deprecated by the GenAI conventions: off by default
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.response.model"] == "gpt-4o-mini"
    assert (attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"]) == (10, 5)
    assert attrs["gen_ai.response.finish_reasons"] == ("stop",)
    assert attrs["gen_ai.usage.cost"] == pytest.approx(10 * 0.15e-6 + 5 * 0.6e-6)
    for key in (
        "llm.model",
        "llm.prompt_tokens",
        "llm.completion_tokens",
        "llm.total_tokens",
        "llm.cost_usd",
        "llm.latency_ms",
        "llm.task_id",
        "llm.user_id",
        "llm.status",
    ):
        assert key in attrs
    assert "span test secret prompt" not in str(attrs)  # content capture is off by default
    row = only_row(runtime)
    assert row.trace_id == format(span.context.trace_id, "032x")


def test_error_span_has_error_type(
    runtime: Runtime, sim: SimulatorServer, tracer: Tracer, span_exporter: InMemorySpanExporter
) -> None:
    sim.state.schedule_fault("429")
    with pytest.raises(openai.RateLimitError):
        LLMClient(runtime=runtime, tracer=tracer).chat_completion(messages=MESSAGES)
    (span,) = span_exporter.get_finished_spans()
    assert span.attributes is not None and span.attributes["error.type"] == "RateLimitError"
    assert not span.status.is_ok


async def test_async_client_records_each_of_many_concurrent_calls_once(
    runtime: Runtime, sim: SimulatorServer
) -> None:
    client = AsyncLLMClient(task_id="t-async", runtime=runtime)
    responses = await asyncio.gather(
        *(client.chat_completion(messages=MESSAGES, model="gpt-4o-mini") for _ in range(40))
    )

    assert len({r.id for r in responses}) == 40  # type: ignore[union-attr]
    found = rows(runtime)
    assert len(found) == 40 and len({r.request_id for r in found}) == 40
    with runtime.session_factory() as session:
        assert session.scalar(select(func.sum(UsageRollupDaily.requests))) == 40


async def test_async_stream_is_recorded(runtime: Runtime, sim: SimulatorServer) -> None:
    script(
        sim,
        match_user="astream",
        reply={"content": "a b c", "usage": {"prompt_tokens": 100, "completion_tokens": 50}},
    )
    stream = await AsyncLLMClient(runtime=runtime).chat_completion(
        messages=[{"role": "user", "content": "astream"}], model="gpt-4o-mini", stream=True
    )
    async for _ in stream:  # type: ignore[union-attr]
        pass
    assert only_row(runtime).cost_usd == Decimal("0.000045")


def test_seed_usage_helpers_report_the_calls(runtime: Runtime, sim: SimulatorServer) -> None:
    script(
        sim,
        match_user="Say",
        reply={"content": "hi", "usage": {"prompt_tokens": 1000, "completion_tokens": 1000}},
    )
    client = LLMClient(task_id="task-123", user_id="user-456", runtime=runtime)
    client.chat_completion(messages=MESSAGES, model="gpt-4", temperature=0.7)

    task = client.get_task_usage()
    # gpt-4: $30 input, $60 output per million tokens
    assert task["total_requests"] == 1 and task["total_cost_usd"] == pytest.approx(0.09)
    assert client.get_user_usage()["total_tokens"] == 2000
    limits = client.check_usage_limits(max_cost_per_task=0.05, max_cost_per_user=100.0)
    assert limits["within_limits"] is False
    assert limits["task_cost_usd"] == pytest.approx(0.09)
    assert client.check_usage_limits(max_cost_per_task=10.0, max_cost_per_user=100.0)[
        "within_limits"
    ]


def counter_value(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    total = 0.0
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_a_malformed_stream_chunk_is_an_error_row_and_reraised(
    runtime: Runtime, sim: SimulatorServer
) -> None:
    script(sim, match_user="garbled", reply={"content": "word " * 20, "fault": "malformed"})
    stream = LLMClient(runtime=runtime).chat_completion(
        messages=[{"role": "user", "content": "garbled stream"}], model="gpt-4o-mini", stream=True
    )

    with pytest.raises(ValueError):  # the SDK's own json.JSONDecodeError, unchanged
        list(stream)

    row = only_row(runtime)
    assert (row.status, row.error_type, row.is_stream) == ("error", "JSONDecodeError", True)
