"""Scripted replies, fault schedules and the /sim control endpoints, through the real SDK."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.simulator import ScriptRule, SimulatorConfig, SimulatorServer

MODEL = "gpt-4o-mini"
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "apply_edit",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
        },
    }
]


def _ask(client: openai.OpenAI, user: str, **kwargs: Any) -> Any:
    messages = [{"role": "system", "content": "You fix code."}, {"role": "user", "content": user}]
    return client.chat.completions.create(
        model=kwargs.pop("model", MODEL), messages=messages, **kwargs
    )


def _content(completion: Any) -> str | None:
    content: str | None = completion.choices[0].message.content
    return content


def test_scripted_sequence_answers_in_order_then_repeats_the_last(
    client: openai.OpenAI, sim: SimulatorServer
) -> None:
    sim.state.add_scripts([ScriptRule(match_user="fix", replies=["bad edit", "good edit"])])

    replies = [_content(_ask(client, "please fix the bug")) for _ in range(3)]

    assert replies == ["bad edit", "good edit", "good edit"]


@pytest.mark.parametrize(
    ("after_last", "expected"),
    [("cycle", ["a", "b", "a"]), ("stop", ["a", "b", "fallback"])],
)
def test_spent_sequence_cycles_or_falls_through(
    client: openai.OpenAI, sim: SimulatorServer, after_last: str, expected: list[str]
) -> None:
    sim.state.add_scripts([ScriptRule(replies=["fallback"])])
    sim.state.add_scripts([ScriptRule(replies=["a", "b"], after_last=after_last)])

    assert [_content(_ask(client, "anything")) for _ in range(3)] == expected


def test_rules_match_system_and_model_by_regex(client: openai.OpenAI, sim: SimulatorServer) -> None:
    sim.state.add_scripts(
        [ScriptRule(match_system=r"^You \w+ code", match_model=r"^o\d", regex=True, reply="hit")]
    )

    assert _content(_ask(client, "x", model="o3")) == "hit"
    assert _content(_ask(client, "x", model="gpt-4o")) != "hit"


def test_scripted_tool_call_is_returned_with_finish_reason_tool_calls(
    client: openai.OpenAI, sim: SimulatorServer
) -> None:
    call = {"name": "apply_edit", "arguments": {"path": "app.py"}}
    sim.state.add_scripts([ScriptRule(match_user="edit", replies=[{"tool_calls": [call]}])])

    completion = _ask(client, "edit app.py", tools=TOOLS, n=2)

    ids = set()
    for choice in completion.choices:
        assert choice.finish_reason == "tool_calls"
        [tool_call] = choice.message.tool_calls
        assert tool_call.function.name == "apply_edit"
        assert json.loads(tool_call.function.arguments) == {"path": "app.py"}
        ids.add(tool_call.id)
    assert len(ids) == 2


def test_streamed_tool_call_arguments_reassemble(
    client: openai.OpenAI, sim: SimulatorServer
) -> None:
    call = {"name": "apply_edit", "arguments": {"path": "a/long/path/to/module.py"}}
    sim.state.add_scripts([ScriptRule(replies=[{"tool_calls": [call]}])])

    chunks = list(_ask(client, "edit", tools=TOOLS, stream=True))

    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert deltas[0].function is not None
    assert deltas[0].function.name == "apply_edit"
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert json.loads(arguments) == call["arguments"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_scripted_usage_is_reported_exactly(client: openai.OpenAI, sim: SimulatorServer) -> None:
    usage = {"prompt_tokens": 2000, "completion_tokens": 300, "cached_tokens": 1536}
    sim.state.add_scripts(
        [ScriptRule(replies=[{"content": "ok", "usage": {**usage, "reasoning_tokens": 200}}])]
    )

    reported = _ask(client, "x").usage

    assert (reported.prompt_tokens, reported.completion_tokens, reported.total_tokens) == (
        2000,
        300,
        2300,
    )
    assert reported.prompt_tokens_details.cached_tokens == 1536
    assert reported.completion_tokens_details.reasoning_tokens == 200


def test_scripted_fault_is_raised_then_the_next_reply_answers(
    client: openai.OpenAI, sim: SimulatorServer
) -> None:
    sim.state.add_scripts([ScriptRule(replies=[{"fault": "500"}, "recovered"])])

    with pytest.raises(openai.InternalServerError):
        _ask(client, "x")
    assert _content(_ask(client, "x")) == "recovered"


def test_scheduled_429s_are_retried_by_the_sdk_without_advancing_scripts(
    sim: SimulatorServer,
) -> None:
    sim.state.add_scripts([ScriptRule(replies=["first", "second"])])
    sim.state.schedule_fault("429", times=2)

    with openai.OpenAI(api_key="sim", base_url=sim.base_url, max_retries=2) as retrying:
        completion = _ask(retrying, "x")

    assert _content(completion) == "first"
    stats = sim.state.stats()
    assert stats["requests"] == 3
    assert stats["faults"]["429"] == 2
    assert stats["succeeded"] == 1
    assert stats["response_ids"] == [completion.id]


def test_fault_rate_of_one_fails_every_request() -> None:
    config = SimulatorConfig(fault_rates={"500": 1.0})
    with (
        SimulatorServer(config) as sim,
        openai.OpenAI(api_key="sim", base_url=sim.base_url, max_retries=0) as client,
    ):
        for _ in range(3):
            with pytest.raises(openai.InternalServerError):
                _ask(client, "x")
        assert sim.state.stats()["faults"]["500"] == 3


def test_scripts_load_from_a_json_file(tmp_path: Path) -> None:
    path = tmp_path / "scripts.json"
    path.write_text(json.dumps({"scripts": [{"match_user": "hello", "reply": "from file"}]}))
    config = SimulatorConfig(
        scripts=[ScriptRule(match_user="config", reply="from config")], scripts_path=path
    )
    with (
        SimulatorServer(config) as sim,
        openai.OpenAI(api_key="sim", base_url=sim.base_url, max_retries=0) as client,
    ):
        assert _content(_ask(client, "hello")) == "from file"
        assert _content(_ask(client, "config")) == "from config"


def test_scripts_and_faults_can_be_added_over_http(
    client: openai.OpenAI, sim: SimulatorServer
) -> None:
    control = sim.control_headers
    added = httpx.post(
        f"{sim.url}/sim/scripts", json=[{"match_user": "ping", "reply": "pong"}], headers=control
    )
    scheduled = httpx.post(
        f"{sim.url}/sim/faults", json={"fault": "400", "times": 1}, headers=control
    )

    assert added.json() == {"added": 1}
    assert scheduled.json() == {"scheduled": 1}
    with pytest.raises(openai.BadRequestError):
        _ask(client, "ping")
    assert _content(_ask(client, "ping")) == "pong"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/sim/scripts", [{"match_user": "ping", "reply": "scripted by a stranger"}]),
        ("POST", "/sim/faults", {"fault": "500", "times": 5}),
        ("POST", "/sim/reset", None),
        ("GET", "/sim/stats", None),
    ],
)
@pytest.mark.parametrize(
    "authorization", [None, "Bearer", "Bearer not-the-token", "Basic c2ltOnNpbQ=="]
)
def test_control_endpoints_refuse_a_request_without_the_control_token(
    client: openai.OpenAI,
    sim: SimulatorServer,
    method: str,
    path: str,
    body: Any,
    authorization: str | None,
) -> None:
    _ask(client, "counted")
    headers = {} if authorization is None else {"Authorization": authorization}

    response = httpx.request(method, f"{sim.url}{path}", json=body, headers=headers)

    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "invalid_control_token"
    assert sim.control_token not in response.text
    stats = sim.state.stats()  # nothing changed: no script, no fault, no reset
    assert stats["requests"] == 1
    assert _content(_ask(client, "ping")) != "scripted by a stranger"


def test_each_simulator_has_its_own_random_control_token(sim: SimulatorServer) -> None:
    with SimulatorServer() as other:
        assert len(other.control_token) >= 32
        assert other.control_token != sim.control_token
        foreign = httpx.get(f"{other.url}/sim/stats", headers=sim.control_headers)
        own = httpx.get(f"{other.url}/sim/stats", headers=other.control_headers)
    assert foreign.status_code == 401
    assert own.status_code == 200


def test_invalid_script_is_rejected_with_an_openai_error(sim: SimulatorServer) -> None:
    response = httpx.post(
        f"{sim.url}/sim/scripts", json=[{"match_user": "x"}], headers=sim.control_headers
    )

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_stats_count_requests_and_reset_over_http(
    client: openai.OpenAI, sim: SimulatorServer
) -> None:
    first = _ask(client, "x")
    list(_ask(client, "x", stream=True))
    with pytest.raises(openai.RateLimitError):
        _ask(client, "x", extra_headers={"x-sim-fault": "429"})

    stats = httpx.get(f"{sim.url}/sim/stats", headers=sim.control_headers).json()
    assert stats["requests"] == 3
    assert stats["streams"] == 1
    assert stats["succeeded"] == 2
    assert stats["faults"]["429"] == 1
    assert stats["by_model"] == {MODEL: 3}
    assert stats["response_ids"][0] == first.id
    assert stats["billed_usage"]["prompt_tokens"] == 2 * first.usage.prompt_tokens
    assert stats["billed_usage"]["total_tokens"] == 2 * first.usage.total_tokens

    reset = httpx.post(f"{sim.url}/sim/reset", headers=sim.control_headers).json()
    assert reset["requests"] == 0
    assert reset["response_ids"] == []


def test_malformed_request_is_counted_as_invalid(
    client: openai.OpenAI, sim: SimulatorServer
) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])

    stats = sim.state.stats()
    assert (stats["requests"], stats["invalid"], stats["succeeded"]) == (1, 1, 0)


async def test_concurrent_requests_are_all_counted(
    sim: SimulatorServer, async_client: Callable[[], openai.AsyncOpenAI]
) -> None:
    sim.state.add_scripts([ScriptRule(replies=[str(i) for i in range(40)])])
    async with async_client() as client:
        completions = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "x"}]
                )
                for _ in range(40)
            )
        )

    assert sorted(int(_content(c) or "") for c in completions) == list(range(40))
    stats = sim.state.stats()
    assert (stats["requests"], stats["succeeded"]) == (40, 40)
    assert sorted(stats["response_ids"]) == sorted(c.id for c in completions)
