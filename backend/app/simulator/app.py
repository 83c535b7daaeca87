"""The simulator's FastAPI app: an OpenAI-compatible chat-completions endpoint with faults.

Endpoints:

- ``POST /v1/chat/completions``: the OpenAI request body, answered as OpenAI does (plain JSON or,
  with ``stream: true``, server-sent events; ``stream_options.include_usage`` adds the final
  ``choices: []`` chunk with usage).
- ``GET /v1/models``, ``GET /v1/models/{model}``, ``GET /health``.
- ``GET /sim/stats`` (shape in ``app.simulator.state``), ``POST /sim/reset``,
  ``POST /sim/scripts`` (a rule, a list of rules or ``{"scripts": [...]}``, see
  ``app.simulator.config``), ``POST /sim/faults`` (``{"fault": "429", "times": 3}`` or a list).
  These control endpoints need ``Authorization: Bearer <control token>``: a random token made
  per app (``app.state.control_token``, ``SimulatorServer.control_token``) unless one is given,
  so that no other local process can script the replies or read the counters; without it they
  answer 401.

Per-request headers (all optional):

- ``x-sim-fault``: one of the fault names of ``app.simulator.config``.
- ``x-sim-latency-ms``: delay before the answer, instead of the script's or config's.
- ``x-sim-chunk-delay-ms``: delay between stream chunks, instead of the config's.

Which fault a request gets: the header, else the fault schedule, else the fault rates, else the
matching script reply's ``fault``. A 429, 500 or 400 from the header, the schedule or the rates is
answered before the scripts are consulted, so it does not advance a script's sequence: a retried
request gets the reply the failed one would have got. Responses carry ``x-request-id`` and, when a
fault was injected, ``x-sim-fault``. Malformed requests and bad ``x-sim-*`` headers get OpenAI's
400 ``invalid_request_error`` (codes ``invalid_request``, ``invalid_sim_header``). A request whose
client hangs up during a delay, or which is still held when the server stops, is dropped
(status 499, which the client never sees unless it is still connected).
"""

from __future__ import annotations

import hmac
import json
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.responses import JSONResponse, Response

from app.simulator.completion import ChatCompletionRequest, Completion, plan_completion
from app.simulator.config import (
    FaultName,
    ScheduledFault,
    SimulatorConfig,
    parse_script_rules,
)
from app.simulator.responses import (
    EventStream,
    TruncatedResponse,
    error_response,
    rate_limit_headers,
    request_id_headers,
    sse_event,
    wait_for_client,
)
from app.simulator.state import SimulatorState

REJECTING_FAULTS: frozenset[FaultName] = frozenset({"429", "500", "400"})
MAX_HEADER_DELAY_MS = 600_000.0
_SCHEDULE = TypeAdapter(list[ScheduledFault])


def get_state(request: Request) -> SimulatorState:
    state: SimulatorState = request.app.state.simulator
    return state


StateDep = Annotated[SimulatorState, Depends(get_state)]


class ControlTokenMissing(Exception):
    """A ``/sim/*`` request without the app's control token."""


def require_control_token(request: Request) -> None:
    """The ``/sim/*`` endpoints answer only to ``Authorization: Bearer <control token>``."""
    expected: str = request.app.state.control_token
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), expected.encode()
    ):
        raise ControlTokenMissing


class SimHeaders(BaseModel):
    """The ``x-sim-*`` request headers; validated in the handler so bad ones are counted."""

    model_config = ConfigDict(extra="ignore")

    fault: FaultName | None = Field(default=None, alias="x-sim-fault")
    latency_ms: float | None = Field(
        default=None, alias="x-sim-latency-ms", ge=0, le=MAX_HEADER_DELAY_MS
    )
    chunk_delay_ms: float | None = Field(
        default=None, alias="x-sim-chunk-delay-ms", ge=0, le=MAX_HEADER_DELAY_MS
    )


openai_router = APIRouter(prefix="/v1")
control_router = APIRouter(prefix="/sim", dependencies=[Depends(require_control_token)])


def _rejection(fault: FaultName, state: SimulatorState) -> JSONResponse:
    headers = {"x-sim-fault": fault}
    if fault == "429":
        return error_response(
            429,
            "Rate limit reached (simulated). Please try again later.",
            type_="requests",
            code="rate_limit_exceeded",
            headers={**headers, **rate_limit_headers(state.config.retry_after_seconds)},
        )
    if fault == "500":
        return error_response(
            500,
            "The server had an error while processing your request (simulated).",
            type_="server_error",
            code="server_error",
            headers=headers,
        )
    return error_response(
        400,
        "Invalid request (simulated).",
        type_="invalid_request_error",
        code="simulated_bad_request",
        headers=headers,
    )


def _stream(
    completion: Completion,
    request: ChatCompletionRequest,
    fault: FaultName | None,
    state: SimulatorState,
    chunk_delay_ms: float,
) -> EventStream:
    events = [
        sse_event(json.dumps(c)) for c in completion.chunks(include_usage=request.include_usage)
    ]
    events.append(sse_event("[DONE]"))
    complete = True
    if fault == "truncate":
        finishes = request.n + (1 if request.include_usage else 0) + 1
        events = events[: max(1, (len(events) - finishes) // 2)]
        complete = False
    elif fault == "malformed":
        events.insert(1, sse_event(f'{{"id": "{completion.id}", "choices": [{{"delta": {{"content'))

    def on_complete() -> None:
        if fault in (None, "timeout"):
            state.record_success(completion.id, completion.usage)

    stream = EventStream(
        events,
        chunk_delay_seconds=chunk_delay_ms / 1000,
        complete=complete,
        on_complete=on_complete,
    )
    if fault is not None:
        stream.headers["x-sim-fault"] = fault
    return stream


@openai_router.post("/chat/completions", response_model=None)
async def chat_completions(http_request: Request, state: StateDep) -> Response:
    try:
        headers = SimHeaders.model_validate(dict(http_request.headers))
    except ValidationError as exc:
        state.record_request(model=None, stream=False)
        return error_response(
            400, str(exc), type_="invalid_request_error", code="invalid_sim_header"
        )
    try:
        request = ChatCompletionRequest.model_validate(await http_request.json())
    except (ValueError, ValidationError) as exc:  # JSONDecodeError is a ValueError
        state.record_request(model=None, stream=False)
        return error_response(400, str(exc), type_="invalid_request_error", code="invalid_request")
    state.record_request(model=request.model, stream=request.stream)
    fault = headers.fault or state.next_unscripted_fault()
    reply = None
    if fault not in REJECTING_FAULTS:
        reply = state.next_reply(
            model=request.model, system=request.system_text, user=request.last_user_text
        )
        fault = fault or (reply.fault if reply else None)

    config = state.config
    delay_ms = headers.latency_ms
    if delay_ms is None:
        delay_ms = reply.latency_ms if reply and reply.latency_ms is not None else config.latency_ms
    if fault is not None:
        state.record_fault(fault)
    if delay_ms > 0 and not await wait_for_client(http_request, delay_ms / 1000, state.closing):
        return Response(status_code=499)
    if fault in REJECTING_FAULTS:
        return _rejection(fault, state)
    if fault == "timeout" and not await wait_for_client(
        http_request, config.timeout_fault_seconds, state.closing
    ):
        return Response(status_code=499)

    completion = plan_completion(request, reply, fault, state)
    if request.stream:
        chunk_delay = headers.chunk_delay_ms
        if chunk_delay is None:
            chunk_delay = config.stream_chunk_delay_ms
        return _stream(completion, request, fault, state, chunk_delay)
    fault_headers = {"x-sim-fault": fault} if fault else {}
    if fault == "truncate":
        return TruncatedResponse(completion.body(), headers=fault_headers)
    if fault == "malformed":
        broken = json.dumps(completion.body())[:-1] + ", <simulated malformed body>"
        return Response(
            broken, media_type="application/json", headers={**request_id_headers(), **fault_headers}
        )
    if fault in (None, "timeout"):
        state.record_success(completion.id, completion.usage)
    return JSONResponse(completion.body(), headers={**request_id_headers(), **fault_headers})


def _model_entry(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 1_700_000_000, "owned_by": "asa-simulator"}


@openai_router.get("/models")
async def list_models(state: StateDep) -> dict[str, Any]:
    return {"object": "list", "data": [_model_entry(m) for m in state.config.models]}


@openai_router.get("/models/{model:path}", response_model=None)
async def retrieve_model(model: str, state: StateDep) -> dict[str, Any] | JSONResponse:
    if model not in state.config.models:
        return error_response(
            404,
            f"The model '{model}' does not exist",
            type_="invalid_request_error",
            code="model_not_found",
        )
    return _model_entry(model)


@control_router.get("/stats")
async def get_stats(state: StateDep) -> dict[str, Any]:
    return state.stats()


@control_router.post("/reset")
async def reset(state: StateDep) -> dict[str, Any]:
    state.reset()
    return state.stats()


@control_router.post("/scripts")
async def add_scripts(state: StateDep, body: Annotated[Any, Body()]) -> dict[str, int]:
    rules = parse_script_rules(body)
    state.add_scripts(rules)
    return {"added": len(rules)}


@control_router.post("/faults")
async def schedule_faults(state: StateDep, body: Annotated[Any, Body()]) -> dict[str, int]:
    items = _SCHEDULE.validate_python(body if isinstance(body, list) else [body])
    state.extend_schedule(items)
    return {"scheduled": sum(item.times for item in items)}


def _invalid_request(_: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, ValidationError | RequestValidationError) else []
    message = "; ".join(str(e.get("msg")) for e in errors) or str(exc)
    return error_response(400, message, type_="invalid_request_error", code="invalid_request")


def _control_token_missing(_: Request, _exc: Exception) -> JSONResponse:
    return error_response(
        401,
        "The /sim control endpoints need Authorization: Bearer <the simulator's control token>.",
        type_="invalid_request_error",
        code="invalid_control_token",
        headers={"WWW-Authenticate": "Bearer"},
    )


def create_app(
    config: SimulatorConfig | None = None, *, control_token: str | None = None
) -> FastAPI:
    """A new simulator app with its own ``SimulatorState`` at ``app.state.simulator`` and the
    token its ``/sim/*`` endpoints require at ``app.state.control_token`` (random unless
    ``control_token`` is given)."""
    if control_token is not None and len(control_token) < 16:
        raise ValueError("a control token must be at least 16 characters")
    app = FastAPI(title="ASA LLM simulator", openapi_url=None)
    app.state.simulator = SimulatorState(config or SimulatorConfig())
    app.state.control_token = control_token or secrets.token_urlsafe(32)
    app.include_router(openai_router)
    app.include_router(control_router)
    from app.simulator.routes import router as more_apis  # Responses API, embeddings

    app.include_router(more_apis)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(ValidationError, _invalid_request)
    app.add_exception_handler(ControlTokenMissing, _control_token_missing)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
