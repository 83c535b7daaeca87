"""``responses.stream()`` and ``responses.parse()`` through the real SDK against the simulator:
one row per call, like ``responses.create``."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import openai
import pytest
from openai.types.responses import ParsedResponse
from pydantic import BaseModel
from sqlalchemy import select

from app.core.runtime import Runtime
from app.models import LLMUsage
from app.simulator.config import ScriptRule
from app.simulator.server import SimulatorServer
from app.tracking.llm_client import AsyncLLMClient, LLMClient

M = Decimal(1_000_000)
USAGE = {"prompt_tokens": 120, "completion_tokens": 30}
MINI = (120 * Decimal("0.15") + 30 * Decimal("0.60")) / M  # gpt-4o-mini per million


def script(sim: SimulatorServer, **rule: Any) -> None:
    sim.state.add_scripts([ScriptRule.model_validate(rule)])


def only_row(runtime: Runtime) -> LLMUsage:
    with runtime.session_factory() as session:
        found = list(session.scalars(select(LLMUsage)))
    assert len(found) == 1, found
    return found[0]


class Plan(BaseModel):
    steps: list[str]
    done: bool


def test_a_parsed_response_is_the_sdks_object_and_one_priced_row(
    runtime: Runtime, sim: SimulatorServer
) -> None:
    script(sim, match_user="plan", reply={"usage": USAGE})

    response = LLMClient(runtime=runtime).responses.parse(
        model="gpt-4o-mini", input="plan it", text_format=Plan
    )

    assert isinstance(response, ParsedResponse) and isinstance(response.output_parsed, Plan)
    row = only_row(runtime)
    assert (row.operation, row.status, row.is_stream) == ("responses", "success", False)
    assert row.cost_usd == MINI


def test_a_response_stream_block_is_one_row_with_the_final_usage(
    runtime: Runtime, sim: SimulatorServer
) -> None:
    script(sim, match_user="stream", reply={"content": "one two three", "usage": USAGE})

    with LLMClient(runtime=runtime).responses.stream(
        model="gpt-4o-mini", input="stream please"
    ) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_response()

    assert events[0] == "response.created" and events[-1] == "response.completed"
    assert final.output_text == "one two three"
    row = only_row(runtime)
    assert (row.operation, row.is_stream, row.is_partial) == ("responses", True, False)
    assert (row.prompt_tokens, row.completion_tokens, row.cost_usd) == (120, 30, MINI)


def test_get_final_response_alone_reads_the_stream_through_the_tracking(
    runtime: Runtime, sim: SimulatorServer
) -> None:
    script(sim, match_user="final", reply={"usage": USAGE})

    with LLMClient(runtime=runtime).responses.stream(
        model="gpt-4o-mini", input="final only", text_format=Plan
    ) as stream:
        final = stream.get_final_response()

    assert isinstance(final.output_parsed, Plan)
    row = only_row(runtime)
    assert (row.is_partial, row.cost_status, row.cost_usd) == (False, "priced", MINI)


def test_a_stream_block_left_early_is_one_partial_row(
    runtime: Runtime, sim: SimulatorServer
) -> None:
    script(sim, match_user="long", reply="word " * 100)

    with LLMClient(runtime=runtime).responses.stream(
        model="gpt-4o-mini", input="long answer"
    ) as stream:
        for _, _event in zip(range(5), stream, strict=False):
            pass

    row = only_row(runtime)
    assert (row.status, row.is_partial, row.cost_status) == ("success", True, "estimated")
    assert "stream_closed_early" in (row.flags or "")


def test_a_refused_stream_is_an_error_row_and_the_sdks_exception(
    runtime: Runtime, sim: SimulatorServer
) -> None:
    script(sim, match_user="boom", reply={"fault": "400"})

    with (
        pytest.raises(openai.BadRequestError),
        LLMClient(runtime=runtime).responses.stream(model="gpt-4o-mini", input="boom"),
    ):
        pass

    row = only_row(runtime)
    assert (row.status, row.error_type, row.is_stream) == ("error", "BadRequestError", True)


async def test_async_parse_and_stream(runtime: Runtime, sim: SimulatorServer) -> None:
    script(sim, match_user="structured", reply={"usage": USAGE})
    script(sim, match_user="streamed", reply={"content": "ok", "usage": USAGE})
    client = AsyncLLMClient(runtime=runtime)

    parsed = await client.responses.parse(model="gpt-4o-mini", input="structured", text_format=Plan)
    async with client.responses.stream(model="gpt-4o-mini", input="streamed") as stream:
        final = await stream.get_final_response()

    assert isinstance(parsed.output_parsed, Plan) and final.output_text == "ok"
    with runtime.session_factory() as session:
        found = list(session.scalars(select(LLMUsage).order_by(LLMUsage.is_stream)))
    assert [(r.is_stream, r.is_partial, r.cost_usd) for r in found] == [
        (False, False, MINI),
        (True, False, MINI),
    ]
