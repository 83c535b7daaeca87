"""LLM spans against the OpenTelemetry GenAI semantic conventions v1.41.1, attribute by attribute.

Each table lists every attribute of the spec-owned namespaces (``gen_ai.*``, ``openai.*``,
``server.*``, ``error.type``) that the span must carry, from the spec's tables for OpenAI
inference spans (docs/gen-ai/openai.md) and embeddings spans (docs/gen-ai/gen-ai-spans.md); the
span must carry no other attribute of those namespaces. ``gen_ai.usage.cost`` is ours (kept for
the docs that used it; ``llm.cost_usd`` is canonical), so it is listed too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, Tracer

from app.core.runtime import Runtime
from app.simulator.config import ScriptRule
from app.simulator.server import SimulatorServer
from app.simulator.structured import fingerprint
from app.tracking.llm_client import LLMClient

SPEC_PREFIXES = ("gen_ai.", "openai.", "server.", "error.")
ANY_ID = object()  # any non-empty string
POSITIVE = object()  # any number > 0


class StartAttributes(SpanProcessor):
    """What a span carried when it started (the spec wants sampling attributes there)."""

    def __init__(self) -> None:
        self.at_start: list[dict[str, Any]] = []

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self.at_start.append(dict(span.attributes or {}))

    def on_end(self, span: ReadableSpan) -> None:
        return None


@pytest.fixture
def recorder() -> StartAttributes:
    return StartAttributes()


@pytest.fixture
def spec_tracer(span_exporter: InMemorySpanExporter, recorder: StartAttributes) -> Tracer:
    provider = TracerProvider()
    provider.add_span_processor(recorder)
    provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    return provider.get_tracer("test")


def spec_attributes(span: ReadableSpan) -> dict[str, Any]:
    return {k: v for k, v in (span.attributes or {}).items() if k.startswith(SPEC_PREFIXES)}


def assert_matches(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, want in expected.items():
        got = actual[key]
        if want is ANY_ID:
            assert isinstance(got, str) and got, key
        elif want is POSITIVE:
            assert isinstance(got, int | float) and got > 0, key
        elif isinstance(want, float):
            assert got == pytest.approx(want), key
        else:
            assert got == want, key


def script(sim: SimulatorServer, **rule: Any) -> None:
    sim.state.add_scripts([ScriptRule.model_validate(rule)])


def only_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    (span,) = exporter.get_finished_spans()
    return span


def server(sim: SimulatorServer) -> dict[str, Any]:
    return {"server.address": "127.0.0.1", "server.port": sim.port}


def test_chat_completion_span_carries_every_applicable_attribute(
    runtime: Runtime,
    sim: SimulatorServer,
    spec_tracer: Tracer,
    span_exporter: InMemorySpanExporter,
    recorder: StartAttributes,
) -> None:
    script(
        sim,
        match_user="table",
        reply={
            "content": "ok",
            "usage": {"prompt_tokens": 40, "completion_tokens": 10, "cached_tokens": 0},
        },
    )
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}

    LLMClient(runtime=runtime, tracer=spec_tracer).chat_completion(
        messages=[{"role": "user", "content": "table"}],
        model="gpt-4o-mini",
        temperature=0.5,
        top_p=0.9,
        max_tokens=50,
        n=2,
        seed=42,
        stop=["END"],
        frequency_penalty=0.1,
        presence_penalty=-0.2,
        service_tier="default",
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )

    span = only_span(span_exporter)
    assert (span.name, span.kind) == ("chat gpt-4o-mini", SpanKind.CLIENT)
    assert_matches(
        spec_attributes(span),
        {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": "gpt-4o-mini",
            **server(sim),
            "openai.api.type": "chat_completions",
            "gen_ai.request.temperature": 0.5,
            "gen_ai.request.top_p": 0.9,
            "gen_ai.request.max_tokens": 50,
            "gen_ai.request.choice.count": 2,
            "gen_ai.request.seed": 42,
            "gen_ai.request.stop_sequences": ("END",),
            "gen_ai.request.frequency_penalty": 0.1,
            "gen_ai.request.presence_penalty": -0.2,
            "gen_ai.output.type": "json",
            "openai.request.service_tier": "default",
            "gen_ai.response.model": "gpt-4o-mini",
            "gen_ai.response.id": ANY_ID,
            "gen_ai.response.finish_reasons": ("stop", "stop"),
            "openai.response.system_fingerprint": fingerprint(42),
            "openai.response.service_tier": "default",
            "gen_ai.usage.input_tokens": 40,
            "gen_ai.usage.output_tokens": 10,
            "gen_ai.usage.cache_read.input_tokens": 0,
            "gen_ai.usage.reasoning.output_tokens": 0,
            "gen_ai.usage.cost": (40 * 0.15 + 10 * 0.60) / 1e6,
        },
    )
    assert span.status.status_code == StatusCode.UNSET
    (started,) = recorder.at_start  # sampling-relevant attributes were there at creation
    for key in ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model"):
        assert key in started
    assert started["server.address"] == "127.0.0.1" and started["server.port"] == sim.port


def test_streamed_chat_span_has_stream_and_time_to_first_chunk(
    runtime: Runtime, sim: SimulatorServer, spec_tracer: Tracer, span_exporter: InMemorySpanExporter
) -> None:
    stream = LLMClient(runtime=runtime, tracer=spec_tracer).chat_completion(
        messages=[{"role": "user", "content": "s"}], model="gpt-4o-mini", stream=True
    )
    list(stream)

    attrs = spec_attributes(only_span(span_exporter))
    assert attrs["gen_ai.request.stream"] is True
    assert 0 < attrs["gen_ai.response.time_to_first_chunk"] < 10
    assert attrs["gen_ai.usage.input_tokens"] > 0  # from the usage chunk we asked for


def test_responses_span_follows_the_openai_inference_table(
    runtime: Runtime, sim: SimulatorServer, spec_tracer: Tracer, span_exporter: InMemorySpanExporter
) -> None:
    script(
        sim,
        match_user="resp",
        reply={
            "content": "ok",
            "usage": {
                "prompt_tokens": 300,
                "completion_tokens": 200,
                "cached_tokens": 128,
                "reasoning_tokens": 150,
            },
        },
    )

    LLMClient(runtime=runtime, tracer=spec_tracer).responses.create(
        model="o4-mini",
        input="resp",
        max_output_tokens=500,
        temperature=1.0,
        text={"format": {"type": "json_object"}},
    )

    span = only_span(span_exporter)
    assert span.name == "chat o4-mini"
    assert_matches(
        spec_attributes(span),
        {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": "o4-mini",
            **server(sim),
            "openai.api.type": "responses",
            "gen_ai.request.max_tokens": 500,
            "gen_ai.request.temperature": 1.0,
            "gen_ai.output.type": "json",
            "gen_ai.response.model": "o4-mini",
            "gen_ai.response.id": ANY_ID,
            "gen_ai.response.finish_reasons": ("stop",),
            "openai.response.service_tier": "default",
            "gen_ai.usage.input_tokens": 300,
            "gen_ai.usage.output_tokens": 200,
            "gen_ai.usage.cache_read.input_tokens": 128,
            "gen_ai.usage.reasoning.output_tokens": 150,
            "gen_ai.usage.cost": (172 * 1.10 + 128 * 0.275 + 200 * 4.40) / 1e6,
        },
    )
    assert str(span.attributes["gen_ai.response.id"]).startswith("resp_")  # type: ignore[index]


def test_embeddings_span_follows_the_embeddings_table(
    runtime: Runtime, sim: SimulatorServer, spec_tracer: Tracer, span_exporter: InMemorySpanExporter
) -> None:
    response = LLMClient(runtime=runtime, tracer=spec_tracer).embeddings.create(
        model="text-embedding-3-small", input="embed me", dimensions=64, encoding_format="float"
    )

    span = only_span(span_exporter)
    assert (span.name, span.kind) == ("embeddings text-embedding-3-small", SpanKind.CLIENT)
    assert_matches(
        spec_attributes(span),
        {
            "gen_ai.operation.name": "embeddings",
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": "text-embedding-3-small",
            **server(sim),
            "gen_ai.embeddings.dimension.count": 64,
            "gen_ai.request.encoding_formats": ("float",),
            "gen_ai.response.model": "text-embedding-3-small",
            "gen_ai.usage.input_tokens": response.usage.prompt_tokens,
            "gen_ai.usage.cost": response.usage.prompt_tokens * 0.02 / 1e6,
        },
    )


def test_a_failed_call_has_error_type_error_status_and_no_usage(
    runtime: Runtime, sim: SimulatorServer, spec_tracer: Tracer, span_exporter: InMemorySpanExporter
) -> None:
    import openai

    sim.state.schedule_fault("429")
    with pytest.raises(openai.RateLimitError):
        LLMClient(runtime=runtime, tracer=spec_tracer).chat_completion(
            messages=[{"role": "user", "content": "x"}], model="gpt-4o-mini"
        )

    span = only_span(span_exporter)
    assert_matches(
        spec_attributes(span),
        {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": "gpt-4o-mini",
            **server(sim),
            "openai.api.type": "chat_completions",
            "error.type": "RateLimitError",
            "gen_ai.usage.cost": 0.0,
        },
    )
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes is not None and span.attributes["llm.prompt_tokens"] == 0


def test_usage_attributes_are_absent_when_the_provider_sent_none(
    runtime: Runtime, sim: SimulatorServer, spec_tracer: Tracer, span_exporter: InMemorySpanExporter
) -> None:
    stream = LLMClient(runtime=runtime, tracer=spec_tracer).chat_completion(
        messages=[{"role": "user", "content": "x"}],
        model="gpt-4o-mini",
        stream=True,
        stream_options={"include_usage": False},
    )
    list(stream)

    attrs = dict(only_span(span_exporter).attributes or {})
    assert not [k for k in attrs if k.startswith("gen_ai.usage.") and k != "gen_ai.usage.cost"]
    assert attrs["llm.cost_status"] == "estimated" and attrs["llm.prompt_tokens"] > 0


def test_the_seeds_llm_attributes_stay(
    runtime: Runtime, sim: SimulatorServer, spec_tracer: Tracer, span_exporter: InMemorySpanExporter
) -> None:
    LLMClient(
        task_id="t", user_id="u", agent="a", runtime=runtime, tracer=spec_tracer
    ).responses.create(model="gpt-4o-mini", input="x")

    attrs = dict(only_span(span_exporter).attributes or {})
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
        assert key in attrs, key
    assert attrs["llm.cost_usd"] == attrs["gen_ai.usage.cost"]


@pytest.mark.parametrize("enabled", [False, True])
def test_deprecated_gen_ai_system_only_on_request(
    runtime_factory: Callable[..., Runtime],
    sim: SimulatorServer,
    spec_tracer: Tracer,
    span_exporter: InMemorySpanExporter,
    enabled: bool,
) -> None:
    runtime = runtime_factory(otel_genai_deprecated_attributes=enabled)
    LLMClient(runtime=runtime, tracer=spec_tracer).chat_completion(
        messages=[{"role": "user", "content": "x"}], model="claude-sonnet-4-5"
    )
    attrs = dict(only_span(span_exporter).attributes or {})
    assert attrs["gen_ai.provider.name"] == "anthropic"
    assert attrs.get("gen_ai.system") == ("anthropic" if enabled else None)


def test_captured_content_uses_the_conventions_json_shapes(
    runtime_factory: Callable[..., Runtime],
    sim: SimulatorServer,
    spec_tracer: Tracer,
    span_exporter: InMemorySpanExporter,
) -> None:
    runtime = runtime_factory(otel_instrumentation_genai_capture_message_content=True)
    script(sim, match_user="weather", reply={"content": "Sunny."})
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]

    LLMClient(runtime=runtime, tracer=spec_tracer).chat_completion(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "weather?"},
        ],
        model="gpt-4o-mini",
        n=2,
        tools=tools,
    )

    attrs = dict(only_span(span_exporter).attributes or {})
    assert json.loads(str(attrs["gen_ai.input.messages"])) == [
        {"role": "system", "parts": [{"type": "text", "content": "Be brief."}]},
        {"role": "user", "parts": [{"type": "text", "content": "weather?"}]},
    ]
    assert (
        json.loads(str(attrs["gen_ai.output.messages"]))
        == [
            {
                "role": "assistant",
                "parts": [{"type": "text", "content": "Sunny."}],
                "finish_reason": "stop",
            },
        ]
        * 2
    )
    assert json.loads(str(attrs["gen_ai.tool.definitions"])) == [
        {"type": "function", "name": "get_weather"}
    ]


def test_captured_responses_content_keeps_instructions_apart(
    runtime_factory: Callable[..., Runtime],
    sim: SimulatorServer,
    spec_tracer: Tracer,
    span_exporter: InMemorySpanExporter,
) -> None:
    runtime = runtime_factory(otel_instrumentation_genai_capture_message_content=True)
    script(sim, match_user="hello", reply={"content": "Hi."})

    LLMClient(runtime=runtime, tracer=spec_tracer).responses.create(
        model="gpt-4o-mini", input="hello", instructions="Greet."
    )

    attrs = dict(only_span(span_exporter).attributes or {})
    assert json.loads(str(attrs["gen_ai.system_instructions"])) == [
        {"type": "text", "content": "Greet."}
    ]
    assert json.loads(str(attrs["gen_ai.input.messages"])) == [
        {"role": "user", "parts": [{"type": "text", "content": "hello"}]}
    ]
    assert json.loads(str(attrs["gen_ai.output.messages"])) == [
        {
            "role": "assistant",
            "parts": [{"type": "text", "content": "Hi."}],
            "finish_reason": "stop",
        }
    ]
