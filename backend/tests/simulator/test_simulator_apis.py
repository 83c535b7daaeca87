"""The simulator's Responses API, embeddings and output constraints, through the real SDK."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import openai
import pytest
from pydantic import BaseModel

from app.simulator import SimulatorServer
from app.simulator.config import ScriptRule
from app.simulator.structured import DEFAULT_FINGERPRINT, instance_of
from app.simulator.tokens import prompt_tokens, text_tokens

MODEL = "gpt-4o-mini"
DEFAULT_REPLY = "This is a simulated reply from the ASA LLM simulator."


def script(sim: SimulatorServer, **rule: Any) -> None:
    sim.state.add_scripts([ScriptRule.model_validate(rule)])


class Answer(BaseModel):
    title: str
    steps: list[str]
    count: int
    done: bool
    note: str | None


# -- the Responses API ---------------------------------------------------------------------------


def test_a_response_has_the_sdk_shape_and_estimated_usage(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="Say hello.", instructions="Be terse.")

    assert response.id.startswith("resp_") and response.object == "response"
    assert (response.status, response.model, response.output_text) == (
        "completed",
        MODEL,
        DEFAULT_REPLY,
    )
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant"
    usage = response.usage
    assert usage is not None
    messages = [
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": "Say hello."},
    ]
    assert usage.input_tokens == prompt_tokens(messages, None)
    assert usage.output_tokens == text_tokens(DEFAULT_REPLY)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0
    assert usage.output_tokens_details.reasoning_tokens == 0


def test_a_reasoning_model_reports_reasoning_tokens_and_a_reasoning_item(
    client: openai.OpenAI,
) -> None:
    response = client.responses.create(model="o4-mini", input="think")

    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.usage is not None
    reasoning = response.usage.output_tokens_details.reasoning_tokens
    assert reasoning > 0 and response.usage.output_tokens > reasoning


def test_a_streamed_response_sends_the_real_event_sequence(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model=MODEL, input="stream", stream=True))

    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    final = events[-1].response  # type: ignore[union-attr]
    assert deltas == final.output_text == DEFAULT_REPLY
    assert events[0].response.usage is None and final.usage is not None  # type: ignore[union-attr]
    assert final.id == events[0].response.id  # type: ignore[union-attr]


def test_a_scripted_tool_call_is_a_function_call_item(
    client: openai.OpenAI, sim: SimulatorServer
) -> None:
    tools: Any = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
    reply = {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}
    script(sim, match_user="weather", reply=reply)

    response = client.responses.create(model=MODEL, input="weather?", tools=tools)
    streamed = list(
        client.responses.create(model=MODEL, input="weather?", tools=tools, stream=True)
    )

    (call,) = response.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.arguments == '{"city": "Oslo"}'
    done = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert done[0].arguments == '{"city": "Oslo"}'  # type: ignore[union-attr]


def test_max_output_tokens_makes_an_incomplete_response(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="x", max_output_tokens=4)

    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 4


def test_structured_output_of_a_response_parses(client: openai.OpenAI) -> None:
    response = client.responses.parse(model=MODEL, input="answer", text_format=Answer)

    parsed = response.output_parsed
    assert isinstance(parsed, Answer) and parsed.steps


def test_faults_apply_to_responses(client: openai.OpenAI, sim: SimulatorServer) -> None:
    with pytest.raises(openai.RateLimitError):
        client.responses.create(model=MODEL, input="x", extra_headers={"x-sim-fault": "429"})
    with pytest.raises((openai.APIError, ValueError)):
        list(
            client.responses.create(
                model=MODEL, input="x", stream=True, extra_headers={"x-sim-fault": "truncate"}
            )
        )
    stats = sim.state.stats()
    assert (stats["requests"], stats["succeeded"], stats["streams"]) == (2, 0, 1)
    assert stats["faults"]["429"] == 1 and stats["faults"]["truncate"] == 1


async def test_the_async_sdk_streams_a_response(
    async_client: Callable[[], openai.AsyncOpenAI], sim: SimulatorServer
) -> None:
    async with async_client() as client:
        stream = await client.responses.create(model=MODEL, input="a", stream=True)
        types = [event.type async for event in stream]
    assert types[-1] == "response.completed"
    assert sim.state.stats()["succeeded"] == 1


# -- embeddings ----------------------------------------------------------------------------------


def test_embeddings_are_unit_vectors_of_the_models_size(client: openai.OpenAI) -> None:
    small = client.embeddings.create(model="text-embedding-3-small", input=["a cat", "a dog"])
    large = client.embeddings.create(model="text-embedding-3-large", input="a cat")

    assert [len(d.embedding) for d in small.data] == [1536, 1536]
    assert len(large.data[0].embedding) == 3072
    assert math.isclose(sum(x * x for x in small.data[0].embedding), 1.0, rel_tol=1e-5)
    assert small.data[0].embedding != small.data[1].embedding
    assert small.usage.prompt_tokens == text_tokens("a cat") + text_tokens("a dog")
    assert small.usage.total_tokens == small.usage.prompt_tokens


def test_the_same_text_embeds_the_same_way_in_float_and_base64(client: openai.OpenAI) -> None:
    as_float = client.embeddings.create(
        model="text-embedding-3-small", input="same", encoding_format="float", dimensions=32
    )
    decoded = client.embeddings.create(model="text-embedding-3-small", input="same", dimensions=32)

    assert len(as_float.data[0].embedding) == 32
    assert decoded.data[0].embedding == pytest.approx(as_float.data[0].embedding, rel=1e-6)


def test_token_id_inputs_count_one_token_per_id(client: openai.OpenAI) -> None:
    response = client.embeddings.create(model="text-embedding-3-small", input=[[1, 2, 3], [4, 5]])
    assert response.usage.prompt_tokens == 5 and len(response.data) == 2


def test_an_empty_embedding_input_is_a_400(client: openai.OpenAI, sim: SimulatorServer) -> None:
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="text-embedding-3-small", input="")
    assert sim.state.stats()["invalid"] == 1


def test_scripted_usage_and_faults_apply_to_embeddings(
    client: openai.OpenAI, sim: SimulatorServer
) -> None:
    script(sim, match_user="exact", reply={"usage": {"prompt_tokens": 777}})
    exact = client.embeddings.create(model="text-embedding-3-small", input="exact please")
    sim.state.schedule_fault("500")
    with pytest.raises(openai.InternalServerError):
        client.embeddings.create(model="text-embedding-3-small", input="fails")

    assert exact.usage.prompt_tokens == 777
    assert sim.state.stats()["billed_usage"]["prompt_tokens"] == 777


# -- output constraints of chat completions ------------------------------------------------------


def test_a_json_schema_response_format_is_answered_with_valid_json(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "answer"}], response_format=Answer
    )

    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Answer)
    assert parsed.title == DEFAULT_REPLY and parsed.steps == [DEFAULT_REPLY]


def test_schema_instances_follow_refs_enums_and_minimums() -> None:
    schema = {
        "type": "object",
        "properties": {
            "kind": {"enum": ["a", "b"]},
            "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "minItems": 2},
            "level": {"type": "integer", "minimum": 3},
            "tag": {"anyOf": [{"type": "null"}, {"type": "string", "minLength": 5}]},
        },
        "required": ["kind", "items", "level", "tag"],
        "$defs": {"Item": {"type": "object", "properties": {"x": {"const": 1}}}},
    }

    assert instance_of(schema, "hi") == {
        "kind": "a",
        "items": [{"x": 1}, {"x": 1}],
        "level": 3,
        "tag": "hixxx",
    }


def test_stop_sequences_cut_the_reply(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], stop=["simulated", "ASA"]
    )

    choice = completion.choices[0]
    assert (choice.message.content, choice.finish_reason) == ("This is a ", "stop")
    assert completion.usage is not None
    assert completion.usage.completion_tokens == text_tokens("This is a ")


def test_the_seed_is_echoed_in_the_system_fingerprint(client: openai.OpenAI) -> None:
    def fingerprint(**kwargs: Any) -> str | None:
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], **kwargs
        ).system_fingerprint

    assert fingerprint(seed=7) == fingerprint(seed=7) != fingerprint(seed=8)
    assert fingerprint() == DEFAULT_FINGERPRINT
