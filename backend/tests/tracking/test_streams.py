"""What the stream states read from the SDK's own event and chunk types."""

from __future__ import annotations

from typing import Any

from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from app.tracking.streams import ResponsesStreamState

EVENT = TypeAdapter(ResponseStreamEvent)


def response(status: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "model": "gpt-4o-mini",
        "status": status,
        "output": [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        **extra,
    }


def test_a_failed_response_is_a_failure_with_its_error_code_and_usage() -> None:
    state = ResponsesStreamState()
    usage = {
        "input_tokens": 12,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 3,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 15,
    }
    for event in (
        {"type": "response.created", "sequence_number": 0, "response": response("in_progress")},
        {
            "type": "response.output_text.delta",
            "sequence_number": 1,
            "item_id": "m",
            "output_index": 0,
            "content_index": 0,
            "delta": "par",
            "logprobs": [],
        },
        {
            "type": "response.failed",
            "sequence_number": 2,
            "response": response(
                "failed", error={"code": "server_error", "message": "boom"}, usage=usage
            ),
        },
    ):
        state.see(EVENT.validate_python(event))

    fields = state.fields()
    assert (fields.failure, fields.finish_reasons, fields.id) == (
        "server_error",
        ["error"],
        "resp_1",
    )
    assert fields.usage.input_tokens == 12 and fields.text == "par"


def test_an_error_event_without_a_final_response_is_a_failure() -> None:
    state = ResponsesStreamState()
    state.see(
        EVENT.validate_python(
            {"type": "response.created", "sequence_number": 0, "response": response("in_progress")}
        )
    )
    state.see(
        EVENT.validate_python(
            {
                "type": "error",
                "sequence_number": 1,
                "code": "rate_limited",
                "message": "slow down",
                "param": None,
            }
        )
    )

    fields = state.fields()
    assert (fields.failure, fields.model, fields.usage) == ("rate_limited", "gpt-4o-mini", None)
