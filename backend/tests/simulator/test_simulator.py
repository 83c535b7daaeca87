"""The simulator through the real openai SDK over HTTP: answers, usage, streams and faults."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from app.simulator import FAULT_NAMES, SimulatorServer
from app.simulator.tokens import prompt_tokens, text_tokens

MODEL = "gpt-4o-mini"
MESSAGES: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello."},
]
DEFAULT_REPLY = "This is a simulated reply from the ASA LLM simulator."


def test_plain_completion_parses_with_estimated_usage(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert completion.id.startswith("chatcmpl-")
    assert completion.model == MODEL
    assert completion.object == "chat.completion"
    assert completion._request_id is not None
    assert completion._request_id.startswith("req_")
    [choice] = completion.choices
    assert choice.finish_reason == "stop"
    assert choice.message.content == DEFAULT_REPLY
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == prompt_tokens(MESSAGES, None)
    assert usage.completion_tokens == text_tokens(DEFAULT_REPLY)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 0


def test_repeated_long_prefix_is_reported_as_cached_in_steps_of_128(
    client: openai.OpenAI,
) -> None:
    system = {"role": "system", "content": "x" * 5000}  # 4 + 1250 tokens
    first = client.chat.completions.create(
        model=MODEL, messages=[system, {"role": "user", "content": "one"}]
    )
    second = client.chat.completions.create(
        model=MODEL, messages=[system, {"role": "user", "content": "two"}]
    )

    assert first.usage is not None
    assert first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage is not None
    assert second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens == 1024 + 128


def test_short_repeated_prompt_is_below_the_cache_minimum(client: openai.OpenAI) -> None:
    client.chat.completions.create(model=MODEL, messages=MESSAGES)
    again = client.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert again.usage is not None
    assert again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens == 0


@pytest.mark.parametrize("model", ["o1", "o3", "o3-mini", "o4-mini", "gpt-5", "gpt-5-mini"])
def test_reasoning_models_report_reasoning_tokens_inside_completion_tokens(
    client: openai.OpenAI, model: str
) -> None:
    completion = client.chat.completions.create(model=model, messages=MESSAGES)

    usage = completion.usage
    assert usage is not None
    assert usage.completion_tokens_details is not None
    reasoning = usage.completion_tokens_details.reasoning_tokens
    assert reasoning is not None
    assert reasoning > 0
    assert usage.completion_tokens == reasoning + text_tokens(DEFAULT_REPLY)


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4.1-mini", "gpt-5-chat-latest"])
def test_other_models_report_no_reasoning_tokens(client: openai.OpenAI, model: str) -> None:
    completion = client.chat.completions.create(model=model, messages=MESSAGES)

    assert completion.usage is not None
    assert completion.usage.completion_tokens_details is not None
    assert completion.usage.completion_tokens_details.reasoning_tokens == 0


def test_n_choices_are_all_counted_in_usage(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2)

    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 2 * text_tokens(DEFAULT_REPLY)
    assert completion.usage.prompt_tokens == prompt_tokens(MESSAGES, None)


def test_max_completion_tokens_cuts_the_reply_with_finish_reason_length(
    client: openai.OpenAI,
) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=3
    )

    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content == DEFAULT_REPLY[:12]
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 3


def test_json_response_format_gets_a_json_reply(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, response_format={"type": "json_object"}
    )

    content = completion.choices[0].message.content
    assert content is not None
    assert json.loads(content) == {"reply": DEFAULT_REPLY}


def test_models_are_listed(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]

    assert MODEL in ids
    assert "o4-mini" in ids


def test_stream_yields_content_chunks_then_the_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )

    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) > 3
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == DEFAULT_REPLY
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == prompt_tokens(MESSAGES, None)
    assert chunks[-1].usage.completion_tokens == text_tokens(DEFAULT_REPLY)
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_stream_without_include_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))

    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_async_stream_with_n_choices_yields_usage_for_all(
    async_client: Callable[[], openai.AsyncOpenAI],
) -> None:
    texts = ["", ""]
    usage = None
    async with async_client() as client:
        stream = await client.chat.completions.create(
            model="o4-mini",
            messages=MESSAGES,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
            usage = chunk.usage or usage

    assert texts == [DEFAULT_REPLY, DEFAULT_REPLY]
    assert usage is not None
    assert usage.completion_tokens_details is not None
    reasoning = usage.completion_tokens_details.reasoning_tokens
    assert reasoning is not None
    assert usage.completion_tokens == 2 * text_tokens(DEFAULT_REPLY) + reasoning


def test_stream_is_framed_as_openai_server_sent_events(sim: SimulatorServer) -> None:
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = httpx.post(f"{sim.base_url}/chat/completions", json=body, timeout=10)

    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-1] == ""
    assert events[-2] == "data: [DONE]"
    assert all(event.startswith("data: {") for event in events[:-2])
    assert json.loads(events[-3].removeprefix("data: "))["choices"] == []


async def test_async_plain_completion(async_client: Callable[[], openai.AsyncOpenAI]) -> None:
    async with async_client() as client:
        completion = await client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)

    assert completion.model == "gpt-4.1"
    assert completion.choices[0].message.content == DEFAULT_REPLY


def test_latency_header_delays_the_answer(client: openai.OpenAI) -> None:
    started = time.monotonic()
    client.chat.completions.create(
        model=MODEL, messages=MESSAGES, extra_headers={"x-sim-latency-ms": "300"}
    )

    assert time.monotonic() - started >= 0.3


def test_chunk_delay_header_paces_the_stream(client: openai.OpenAI) -> None:
    started = time.monotonic()
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-sim-chunk-delay-ms": "20"},
        )
    )

    # One delay between consecutive events; the last event is [DONE], not a chunk.
    assert time.monotonic() - started >= 0.02 * len(chunks)


def _create(client: openai.OpenAI, fault: str, *, stream: bool, timeout: float = 10) -> Any:
    """One request with a fault header; a stream is read to its end."""
    result = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=stream,
        stream_options={"include_usage": True} if stream else openai.omit,
        extra_headers={"x-sim-fault": fault},
        timeout=timeout,
    )
    return list(result) if stream else result


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("429", openai.RateLimitError),
        ("500", openai.InternalServerError),
        ("400", openai.BadRequestError),
        ("truncate", openai.APIConnectionError),
        ("malformed", json.JSONDecodeError),
    ],
)
def test_fault_surfaces_as_the_sdks_own_exception(
    client: openai.OpenAI, fault: str, error: type[Exception], stream: bool
) -> None:
    with pytest.raises(error):
        _create(client, fault, stream=stream)


@pytest.mark.parametrize("stream", [False, True])
def test_timeout_fault_surfaces_as_api_timeout_error(client: openai.OpenAI, stream: bool) -> None:
    with pytest.raises(openai.APITimeoutError):
        _create(client, "timeout", stream=stream, timeout=0.3)


def test_rate_limit_error_has_openai_body_and_retry_after(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        _create(client, "429", stream=False)

    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.type == "requests"
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.response.headers["retry-after-ms"] == "10"
    assert caught.value.response.headers["x-sim-fault"] == "429"


def test_truncated_stream_loses_the_finish_and_usage_chunks(client: openai.OpenAI) -> None:
    seen: list[Any] = []
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-sim-fault": "truncate"},
    )
    with pytest.raises(openai.APIConnectionError):
        seen.extend(stream)

    assert seen
    assert all(c.usage is None for c in seen)
    assert all(choice.finish_reason is None for c in seen for choice in c.choices)


@pytest.mark.parametrize("stream", [False, True])
def test_negative_usage_fault_reports_negative_counts(client: openai.OpenAI, stream: bool) -> None:
    result = _create(client, "negative_usage", stream=stream)
    usage = result[-1].usage if stream else result.usage

    assert usage.prompt_tokens < 0
    assert usage.completion_tokens < 0
    assert usage.total_tokens < 0


@pytest.mark.parametrize("stream", [False, True])
def test_absurd_usage_fault_reports_a_trillion_tokens(client: openai.OpenAI, stream: bool) -> None:
    result = _create(client, "absurd_usage", stream=stream)
    usage = result[-1].usage if stream else result.usage

    assert usage.prompt_tokens == 10**12
    assert usage.completion_tokens == 10**12


def test_unknown_fault_header_is_a_counted_bad_request(
    client: openai.OpenAI, sim: SimulatorServer
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _create(client, "teapot", stream=False)

    assert caught.value.code == "invalid_sim_header"
    assert "x-sim-fault" in caught.value.message
    assert sim.state.stats()["invalid"] == 1


def test_every_fault_is_counted(client: openai.OpenAI, sim: SimulatorServer) -> None:
    for fault in FAULT_NAMES:
        with contextlib.suppress(openai.OpenAIError, json.JSONDecodeError):
            _create(client, fault, stream=True, timeout=0.3)

    stats = sim.state.stats()
    assert stats["requests"] == len(FAULT_NAMES)
    assert stats["faults"] == dict.fromkeys(FAULT_NAMES, 1)
    assert stats["succeeded"] == 0
