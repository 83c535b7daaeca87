"""``tool_choice`` in the simulator's Responses API, through the real openai SDK."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

MODEL = "gpt-4o-mini"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
        "required": ["city", "days"],
        "additionalProperties": False,
    },
}
TIME = {
    "type": "function",
    "name": "get_time",
    "parameters": {
        "type": "object",
        "properties": {"zone": {"type": "string"}},
        "required": ["zone"],
    },
}
TOOLS: Any = [WEATHER, TIME]


def test_required_makes_the_output_a_call_of_the_first_function(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=MODEL, input="hello", tools=TOOLS, tool_choice="required"
    )

    calls = [item for item in response.output if item.type == "function_call"]
    assert [call.name for call in calls] == ["get_weather"]
    arguments = json.loads(calls[0].arguments)
    assert isinstance(arguments["city"], str) and arguments["days"] >= 1
    assert not [item for item in response.output if item.type == "message"]
    assert response.tool_choice == "required"


def test_a_named_function_is_the_one_called_streamed_or_not(client: openai.OpenAI) -> None:
    choice: Any = {"type": "function", "name": "get_time"}

    response = client.responses.create(model=MODEL, input="hi", tools=TOOLS, tool_choice=choice)
    events = list(
        client.responses.create(
            model=MODEL, input="hi", tools=TOOLS, tool_choice=choice, stream=True
        )
    )

    (call,) = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_time" and "zone" in json.loads(call.arguments)
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and "zone" in json.loads(done[0].arguments)  # type: ignore[union-attr]
    completed = events[-1]
    assert completed.type == "response.completed"
    streamed_calls = [i for i in completed.response.output if i.type == "function_call"]  # type: ignore[union-attr]
    assert [c.name for c in streamed_calls] == ["get_time"]


def test_auto_and_none_leave_the_reply_as_text(client: openai.OpenAI) -> None:
    for choice in ("auto", "none"):
        response = client.responses.create(
            model=MODEL, input="hello", tools=TOOLS, tool_choice=choice
        )
        assert [item.type for item in response.output] == ["message"]
        assert response.output_text


@pytest.mark.parametrize(
    ("tools", "choice"),
    [
        (None, "required"),
        (TOOLS, {"type": "function", "name": "not_a_tool"}),
    ],
)
def test_a_choice_no_tool_can_satisfy_is_a_400(
    client: openai.OpenAI, tools: Any, choice: Any
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.create(
            model=MODEL,
            input="hello",
            tool_choice=choice,
            **({"tools": tools} if tools else {}),
        )
    assert "tool_choice" in str(raised.value)
