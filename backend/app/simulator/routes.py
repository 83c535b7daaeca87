"""The simulator's Responses API and embeddings endpoints, registered by ``create_app``.

- ``POST /v1/responses``: the Responses API (``app.simulator.responses_api``), plain JSON or,
  with ``stream: true``, named server-sent events.
- ``POST /v1/embeddings``: one deterministic vector per input (``app.simulator.embeddings``).

Both go through the same gate as chat completions: ``x-sim-*`` headers, the fault schedule and
rates, scripts (matched on the last user text and the instructions; for embeddings on the
inputs), latency, and the counters of ``/sim/stats``. A scripted reply's ``content``,
``tool_calls``, ``usage``, ``fault`` and ``latency_ms`` apply to responses; its ``usage``
(``prompt_tokens``), ``fault`` and ``latency_ms`` to embeddings.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse, Response

from app.simulator.app import REJECTING_FAULTS, SimHeaders, StateDep, _rejection
from app.simulator.completion import plan_completion
from app.simulator.config import FaultName, ScriptedReply
from app.simulator.embeddings import EmbeddingsRequest, billed_usage, embeddings_body
from app.simulator.responses import (
    EventStream,
    TruncatedResponse,
    error_response,
    request_id_headers,
    wait_for_client,
)
from app.simulator.responses_api import PlannedResponse, ResponsesRequest
from app.simulator.state import SimulatorState

router = APIRouter(prefix="/v1")
RequestT = TypeVar("RequestT", bound=BaseModel)


@dataclass
class _Gate:
    headers: SimHeaders
    fault: FaultName | None = None
    reply: ScriptedReply | None = None
    answer: Response | None = None  # set when the request is answered at the gate


async def _parse(
    http_request: Request, state: SimulatorState, model: type[RequestT]
) -> tuple[SimHeaders, RequestT] | Response:
    try:
        headers = SimHeaders.model_validate(dict(http_request.headers))
    except ValidationError as exc:
        state.record_request(model=None, stream=False)
        return error_response(
            400, str(exc), type_="invalid_request_error", code="invalid_sim_header"
        )
    try:
        request = model.model_validate(await http_request.json())
    except (ValueError, ValidationError) as exc:  # JSONDecodeError is a ValueError
        state.record_request(model=None, stream=False)
        return error_response(400, str(exc), type_="invalid_request_error", code="invalid_request")
    return headers, request


async def _admit(
    http_request: Request,
    state: SimulatorState,
    headers: SimHeaders,
    *,
    model: str,
    system: str,
    user: str,
) -> _Gate:
    """Faults, scripts and latency, in the chat endpoint's order (see ``app.simulator.app``)."""
    gate = _Gate(headers=headers, fault=headers.fault or state.next_unscripted_fault())
    if gate.fault not in REJECTING_FAULTS:
        gate.reply = state.next_reply(model=model, system=system, user=user)
        gate.fault = gate.fault or (gate.reply.fault if gate.reply else None)
    config = state.config
    delay_ms = headers.latency_ms
    if delay_ms is None:
        scripted = gate.reply.latency_ms if gate.reply else None
        delay_ms = scripted if scripted is not None else config.latency_ms
    if gate.fault is not None:
        state.record_fault(gate.fault)
    if delay_ms > 0 and not await wait_for_client(http_request, delay_ms / 1000, state.closing):
        gate.answer = Response(status_code=499)
    elif gate.fault in REJECTING_FAULTS:
        assert gate.fault is not None
        gate.answer = _rejection(gate.fault, state)
    elif gate.fault == "timeout" and not await wait_for_client(
        http_request, config.timeout_fault_seconds, state.closing
    ):
        gate.answer = Response(status_code=499)
    return gate


def _plain(body: dict[str, Any], fault: FaultName | None) -> Response:
    """A JSON answer, broken as the fault says."""
    fault_headers = {"x-sim-fault": fault} if fault else {}
    if fault == "truncate":
        return TruncatedResponse(body, headers=fault_headers)
    if fault == "malformed":
        broken = json.dumps(body)[:-1] + ", <simulated malformed body>"
        return Response(
            broken, media_type="application/json", headers={**request_id_headers(), **fault_headers}
        )
    return JSONResponse(body, headers={**request_id_headers(), **fault_headers})


def _named_event(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


def _response_stream(
    planned: PlannedResponse, gate: _Gate, state: SimulatorState, chunk_delay_ms: float
) -> EventStream:
    events = [_named_event(e) for e in planned.events()]
    complete = True
    if gate.fault == "truncate":  # the final event (with the usage) never arrives
        events = events[: max(1, (len(events) - 1) // 2)]
        complete = False
    elif gate.fault == "malformed":
        events.insert(1, b'event: response.in_progress\ndata: {"type": "response.in_pro\n\n')

    def on_complete() -> None:
        if gate.fault in (None, "timeout"):
            state.record_success(planned.id, planned.completion.usage)

    stream = EventStream(
        events,
        chunk_delay_seconds=chunk_delay_ms / 1000,
        complete=complete,
        on_complete=on_complete,
    )
    if gate.fault is not None:
        stream.headers["x-sim-fault"] = gate.fault
    return stream


@router.post("/responses", response_model=None)
async def create_response(http_request: Request, state: StateDep) -> Response:
    parsed = await _parse(http_request, state, ResponsesRequest)
    if isinstance(parsed, Response):
        return parsed
    headers, request = parsed
    state.record_request(model=request.model, stream=request.stream)
    gate = await _admit(
        http_request,
        state,
        headers,
        model=request.model,
        system=request.system_text,
        user=request.last_user_text,
    )
    if gate.answer is not None:
        return gate.answer
    planned = PlannedResponse(
        request, plan_completion(request.as_chat(), gate.reply, gate.fault, state)
    )
    if request.stream:
        delay = headers.chunk_delay_ms
        return _response_stream(
            planned, gate, state, state.config.stream_chunk_delay_ms if delay is None else delay
        )
    if gate.fault in (None, "timeout"):
        state.record_success(planned.id, planned.completion.usage)
    return _plain(planned.body(), gate.fault)


@router.post("/embeddings", response_model=None)
async def create_embeddings(http_request: Request, state: StateDep) -> Response:
    parsed = await _parse(http_request, state, EmbeddingsRequest)
    if isinstance(parsed, Response):
        return parsed
    headers, request = parsed
    state.record_request(model=request.model, stream=False)
    gate = await _admit(
        http_request, state, headers, model=request.model, system="", user=request.user_text
    )
    if gate.answer is not None:
        return gate.answer
    usage = billed_usage(request, gate.reply.usage if gate.reply else None)
    if gate.fault in (None, "timeout"):
        state.record_success(f"emb-{uuid.uuid4().hex}", usage)
    return _plain(embeddings_body(request, usage, gate.fault), gate.fault)
