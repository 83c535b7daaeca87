"""The Responses API, embeddings and structured outputs through LLMClient: the real SDK over
HTTP against the simulator, on SQLite and PostgreSQL, with the guarantees of chat completions
(one row per logical call, retries counted, errors recorded and re-raised unchanged, budgets
reserved before the call, the SDK's own objects returned).
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import openai
import pytest
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ParsedChatCompletion
from openai.types.responses import Response
from pydantic import BaseModel
from sqlalchemy import select

from app.core.errors import BudgetExceededError
from app.core.runtime import Runtime
from app.models import LLMUsage
from app.simulator.config import ScriptRule
from app.simulator.server import SimulatorServer
from app.tracking.llm_client import AsyncLLMClient, InvalidLLMRequest, LLMClient

M = Decimal(1_000_000)


def script(sim: SimulatorServer, **rule: Any) -> None:
    sim.state.add_scripts([ScriptRule.model_validate(rule)])


def rows(runtime: Runtime) -> list[LLMUsage]:
    with runtime.session_factory() as session:
        return list(session.scalars(select(LLMUsage).order_by(LLMUsage.timestamp)))


def only_row(runtime: Runtime) -> LLMUsage:
    found = rows(runtime)
    assert len(found) == 1, found
    return found[0]


# -- the Responses API ---------------------------------------------------------------------------


def test_a_response_is_returned_as_the_sdk_object_and_priced_from_its_usage(
    runtime: Runtime, sim: SimulatorServer
) -> None:
    script(
        sim,
        match_user="plan",
        reply={
            "content": "a plan",
            "usage": {
                "prompt_tokens": 3000,
                "completion_tokens": 900,
                "cached_tokens": 2048,
                "reasoning_tokens": 640,
            },
        },
    )

    response = LLMClient(task_id="t-resp", runtime=runtime).responses.create(
        model="o4-mini", input="make a plan", instructions="You plan."
    )

    assert isinstance(response, Response) and response.output_text == "a plan"
    row = only_row(runtime)
    assert (row.operation, row.status, row.finish_reason) == ("responses", "success", "stop")
    assert (row.prompt_tokens, row.cached_tokens) == (3000, 2048)
    assert (row.completion_tokens, row.reasoning_tokens) == (900, 640)
    # o4-mini: $1.10 input, $0.275 cached input, $4.40 output (reasoning within output).
    assert (
        row.cost_usd
        == (952 * Decimal("1.10") + 2048 * Decimal("0.275") + 900 * Decimal("4.40")) / M
    )
    assert row.response_model == "o4-mini" and not row.is_stream


def test_a_streamed_response_passes_every_event_and_is_recorded_at_completion(
    runtime: Runtime, sim: SimulatorServer
) -> None:
    script(
        sim,
        match_user="stream",
        reply={
            "content": "one two three",
            "usage": {"prompt_tokens": 100, "completion_tokens": 50},
        },
    )

    stream = LLMClient(runtime=runtime).responses.create(
        model="gpt-4o-mini", input=[{"role": "user", "content": "stream please"}], stream=True
    )
    events = list(stream)

    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    assert text == "one two three"
    row = only_row(runtime)
    assert (row.operation, row.is_stream, row.is_partial) == ("responses", True, False)
    assert (row.prompt_tokens, row.completion_tokens) == (100, 50)
    assert row.cost_usd == (100 * Decimal("0.15") + 50 * Decimal("0.60")) / M  # gpt-4o-mini


def test_a_response_stream_closed_early_is_partial_and_estimated(
    runtime: Runtime, sim: SimulatorServer
) -> None:
    script(sim, match_user="long", reply="word " * 100)
    stream = LLMClient(runtime=runtime).responses.create(
        model="gpt-4o-mini", input="long answer", stream=True
    )
    iterator = iter(stream)
    for _ in range(6):
        next(iterator)
    stream.close()

    row = only_row(runtime)
    assert (row.status, row.is_partial, row.cost_status) == ("success", True, "estimated")
    assert row.prompt_tokens > 0 and "stream_closed_early" in (row.flags or "")


def test_a_truncated_response_stream_is_an_error_row_and_reraised(
    runtime: Runtime, sim: SimulatorServer
) -> None:
    script(sim, match_user="cut", reply={"content": "word " * 40, "fault": "truncate"})
    stream = LLMClient(runtime=runtime).responses.create(
        model="gpt-4o-mini", input="cut me", stream=True
    )
    with pytest.raises(Exception) as raised:
        list(stream)

    row = only_row(runtime)
    assert (row.status, row.error_type) == ("error", type(raised.value).__name__)
    assert row.is_stream


def test_a_response_cut_by_max_output_tokens_finishes_with_length(
    runtime: Runtime, sim: SimulatorServer
) -> None:
    response = LLMClient(runtime=runtime).responses.create(
        model="gpt-4o-mini", input="say a lot", max_output_tokens=3
    )

    assert response.status == "incomplete"  # type: ignore[union-attr]
    row = only_row(runtime)
    assert (row.finish_reason, row.completion_tokens) == ("length", 3)


def test_response_retries_are_one_row_with_their_attempts(
    runtime_factory: Callable[..., Runtime], sim: SimulatorServer
) -> None:
    runtime = runtime_factory(openai_max_retries=2)
    sim.state.schedule_fault("500", times=2)

    LLMClient(runtime=runtime).responses.create(model="gpt-4o-mini", input="hi")

    row = only_row(runtime)
    assert (row.status, row.attempts, row.operation) == ("success", 3, "responses")
    assert sim.state.stats()["requests"] == 3


def test_a_response_error_is_recorded_and_reraised_unchanged(
    runtime: Runtime, sim: SimulatorServer
) -> None:
    sim.state.schedule_fault("429")
    with pytest.raises(openai.RateLimitError):
        LLMClient(runtime=runtime).responses.create(model="gpt-4o-mini", input="secret text")

    row = only_row(runtime)
    assert (row.status, row.error_type, row.cost_pico_usd) == ("error", "RateLimitError", 0)
    assert (row.operation, row.provider) == ("responses", "openai")


def test_a_response_over_budget_is_blocked_before_it_is_sent(
    runtime_factory: Callable[..., Runtime], sim: SimulatorServer
) -> None:
    runtime = runtime_factory(budget_task_max_usd=Decimal("0.0001"))
    with pytest.raises(BudgetExceededError):
        LLMClient(task_id="t-budget", runtime=runtime).responses.create(
            model="gpt-4.1",
            input="hi",
            max_output_tokens=1000,  # $8/MTok x 1000 = $0.008
        )

    assert only_row(runtime).status == "blocked"
    assert sim.state.stats()["requests"] == 0


def test_response_input_may_be_any_iterable(runtime: Runtime, sim: SimulatorServer) -> None:
    items = ({"role": "user", "content": text} for text in ("first", "second"))

    response = LLMClient(runtime=runtime).responses.create(model="gpt-4o-mini", input=items)

    assert isinstance(response, Response)
    assert only_row(runtime).prompt_tokens == response.usage.input_tokens  # type: ignore[union-attr]


async def test_async_responses_plain_and_streamed(runtime: Runtime, sim: SimulatorServer) -> None:
    client = AsyncLLMClient(runtime=runtime)

    plain = await client.responses.create(model="gpt-4o-mini", input="one")
    stream = await client.responses.create(model="gpt-4o-mini", input="two", stream=True)
    events = [event async for event in stream]  # type: ignore[union-attr]

    assert isinstance(plain, Response)
    assert events[-1].type == "response.completed"
    found = rows(runtime)
    assert [(r.operation, r.is_stream, r.status) for r in found] == [
        ("responses", False, "success"),
        ("responses", True, "success"),
    ]
    assert found[1].prompt_tokens == events[-1].response.usage.input_tokens  # type: ignore[union-attr]


# -- embeddings ----------------------------------------------------------------------------------


def test_embeddings_are_returned_decoded_and_priced_on_input_tokens(
    runtime: Runtime, sim: SimulatorServer
) -> None:
    response = LLMClient(runtime=runtime).embeddings.create(
        model="text-embedding-3-small", input=["first text", "second, longer text"]
    )

    assert isinstance(response, CreateEmbeddingResponse)
    assert len(response.data) == 2 and len(response.data[0].embedding) == 1536
    assert isinstance(response.data[0].embedding[0], float)  # the SDK decoded its base64
    row = only_row(runtime)
    assert (row.operation, row.completion_tokens) == ("embeddings", 0)
    assert row.prompt_tokens == response.usage.prompt_tokens > 0
    assert row.cost_usd == row.prompt_tokens * Decimal("0.02") / M  # $0.02 per MTok
    assert (row.finish_reason, row.response_model) == (None, "text-embedding-3-small")


def test_embeddings_retries_and_errors_are_recorded(
    runtime_factory: Callable[..., Runtime], sim: SimulatorServer
) -> None:
    runtime = runtime_factory(openai_max_retries=1)
    client = LLMClient(runtime=runtime)
    sim.state.schedule_fault("500", times=1)
    client.embeddings.create(model="text-embedding-3-large", input="retried")
    sim.state.schedule_fault("400", times=1)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="text-embedding-3-large", input="refused")

    first, second = rows(runtime)
    assert (first.status, first.attempts) == ("success", 2)
    assert (second.status, second.error_type, second.operation) == (
        "error",
        "BadRequestError",
        "embeddings",
    )


def test_embeddings_need_a_model(runtime: Runtime, sim: SimulatorServer) -> None:
    with pytest.raises(InvalidLLMRequest):
        LLMClient(runtime=runtime).embeddings.create(input="no model")
    assert rows(runtime) == [] and sim.state.stats()["requests"] == 0


async def test_async_embeddings(runtime: Runtime, sim: SimulatorServer) -> None:
    response = await AsyncLLMClient(runtime=runtime).embeddings.create(
        model="text-embedding-3-small", input="hello", dimensions=256, encoding_format="float"
    )
    assert len(response.data[0].embedding) == 256
    assert only_row(runtime).operation == "embeddings"


# -- structured outputs and chat details ---------------------------------------------------------


class Verdict(BaseModel):
    summary: str
    score: int
    passed: bool


def test_parse_returns_the_sdks_parsed_completion_and_one_row(
    runtime: Runtime, sim: SimulatorServer
) -> None:
    completion = LLMClient(runtime=runtime).chat.completions.parse(
        model="gpt-4o", messages=[{"role": "user", "content": "judge"}], response_format=Verdict
    )

    assert isinstance(completion, ParsedChatCompletion)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Verdict)
    row = only_row(runtime)
    assert (row.operation, row.status, row.cost_status) == ("chat", "success", "priced")


async def test_async_parse(runtime: Runtime, sim: SimulatorServer) -> None:
    completion = await AsyncLLMClient(runtime=runtime).chat.completions.parse(
        model="gpt-4o", messages=[{"role": "user", "content": "judge"}], response_format=Verdict
    )
    assert isinstance(completion.choices[0].message.parsed, Verdict)
    assert only_row(runtime).operation == "chat"


def test_messages_may_be_any_iterable(runtime: Runtime, sim: SimulatorServer) -> None:
    messages = (
        m for m in [{"role": "system", "content": "terse"}, {"role": "user", "content": "hi"}]
    )

    LLMClient(runtime=runtime).chat_completion(messages=messages, model="gpt-4o-mini")

    assert only_row(runtime).prompt_tokens > 0


def test_a_callers_include_usage_false_is_respected_and_the_cost_estimated(
    runtime: Runtime, sim: SimulatorServer
) -> None:
    stream = LLMClient(runtime=runtime).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "no usage please"}],
        stream=True,
        stream_options={"include_usage": False},
    )
    chunks = list(stream)

    assert all(c.usage is None for c in chunks)  # the caller asked for no usage chunk
    row = only_row(runtime)
    assert (row.cost_status, row.is_partial) == ("estimated", False)
    assert row.completion_tokens > 0
