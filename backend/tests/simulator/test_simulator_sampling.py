"""``tool_choice``, ``logprobs`` and ``service_tier`` of chat completions, through the official
SDK over HTTP: answered as the API answers them."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from app.simulator import SimulatorServer
from app.simulator.config import ScriptRule

MESSAGES: list[Any] = [{"role": "user", "content": "what is the weather in Paris"}]
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city", "days"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                "required": ["zone"],
            },
        },
    },
]


def test_required_tool_choice_answers_with_a_call_whose_arguments_fit_the_schema(
    client: openai.OpenAI,
) -> None:
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, tools=TOOLS, tool_choice="required"
    )

    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "days"} and isinstance(arguments["days"], int)


def test_a_named_tool_choice_calls_that_function(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )

    (call,) = reply.choices[0].message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_time"
    assert json.loads(call.function.arguments)["zone"] in ("UTC", "CET")
    assert reply.choices[0].finish_reason == "stop"  # as OpenAI ends a named call


def test_tool_choice_none_answers_in_text_even_when_a_script_calls_a_tool(
    sim: SimulatorServer, client: openai.OpenAI
) -> None:
    rule = {"match_user": "weather", "reply": {"tool_calls": [{"name": "get_weather",
            "arguments": '{"city": "Paris", "days": 1}'}]}}  # fmt: skip
    sim.state.add_scripts([ScriptRule.model_validate(rule)])

    auto = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, tools=TOOLS)
    none = client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, tools=TOOLS, tool_choice="none"
    )

    assert auto.choices[0].message.tool_calls
    assert not none.choices[0].message.tool_calls and none.choices[0].message.content


def test_a_streamed_required_call_arrives_in_tool_call_deltas(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, tools=TOOLS, tool_choice="required", stream=True
    )

    deltas = [c.choices[0].delta for c in stream if c.choices]
    arguments = "".join(
        call.function.arguments or ""
        for d in deltas
        for call in d.tool_calls or []
        if call.function is not None
    )
    assert set(json.loads(arguments)) == {"city", "days"}


@pytest.mark.parametrize(
    "tool_choice",
    [
        "required",  # without tools
        {"type": "function", "function": {"name": "get_weather"}},  # without tools
    ],
)
def test_a_tool_choice_without_tools_is_a_400(client: openai.OpenAI, tool_choice: Any) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, tool_choice=tool_choice
        )


def test_naming_a_function_that_is_not_in_tools_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "rm_rf"}},
        )


def test_logprobs_cover_every_token_with_the_alternatives_asked_for(
    client: openai.OpenAI,
) -> None:
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, logprobs=True, top_logprobs=3
    )
    again = client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, logprobs=True, top_logprobs=3
    )

    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    assert "".join(t.token for t in logprobs.content) == reply.choices[0].message.content
    for token in logprobs.content:
        assert token.logprob < 0 and token.bytes == list(token.token.encode())
        assert len(token.top_logprobs) == 3 and token.top_logprobs[0].token == token.token
        ranked = [alt.logprob for alt in token.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
    assert again.choices[0].logprobs == logprobs  # the same text, the same numbers


def test_no_logprobs_unless_asked(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert reply.choices[0].logprobs is None


def test_streamed_logprobs_come_with_each_content_delta(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, logprobs=True, stream=True
    )

    pieces = [
        (c.choices[0].delta.content, c.choices[0].logprobs)
        for c in stream
        if c.choices and c.choices[0].delta.content
    ]
    assert pieces
    for content, logprobs in pieces:
        assert logprobs is not None and logprobs.content is not None
        assert [t.token for t in logprobs.content] == [content]


def test_top_logprobs_without_logprobs_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, top_logprobs=2)


@pytest.mark.parametrize(("asked", "served"), [("flex", "flex"), ("auto", "default"),
                                               ("priority", "priority")])  # fmt: skip
def test_the_service_tier_asked_for_is_the_one_reported(
    client: openai.OpenAI, asked: Any, served: str
) -> None:
    reply = client.chat.completions.create(model="gpt-5", messages=MESSAGES, service_tier=asked)
    assert reply.service_tier == served
