"""One gateway call: who it is for, its budget, the upstream attempts, its one row.

``Gateway.forward`` takes a request to ``/v1/{chat/completions,responses,embeddings}`` and:

1. resolves the caller (``callers``), the model's route (``routing``), the task and agent;
2. starts a ``CallTracker`` (the tracking core: the span, child of the client's
   ``traceparent``), and reserves the budget with the service's ``DatabaseBudgetGuard`` (in
   the service's writer process when it is up, ``reserve_in_writer``, else on the tracking
   thread) - a refusal is recorded as a blocked call and answered 402 before any upstream
   request;
3. sends the body as received (re-encoded only to name another model or to ask a chat stream
   for its usage) to the route's targets in order: 429, 5xx, a timeout or a dropped connection
   moves on to the next target (every attempt counted in the row's ``attempts``; the upstream
   that answered in its flags, ``upstream:<name>``, and its provider and model price the call);
4. answers with the upstream's body and ``x-asa-request-id``, ``x-asa-cost-usd`` and, where a
   limit applies, ``x-asa-budget-remaining-usd`` / ``x-asa-budget-scope``; a stream is passed
   through as it arrives (``streaming``).

Nothing here writes a row itself: the tracker does, through the writer process or the tracking
thread, as for an in-process ``AsyncLLMClient`` call.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aiohttp
import anyio
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Tracer
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from app.api.auth import AccessControl
from app.budgets import store as budget_store
from app.budgets.guard import Reservation, counter_keys
from app.core.errors import AppError
from app.core.money import pico_to_usd
from app.core.redaction import redact
from app.core.runtime import Runtime
from app.gateway.callers import Caller, Callers, is_forwarded
from app.gateway.errors import GatewayError, error_body, from_app_error
from app.gateway.routing import (
    DEFAULT_UPSTREAM,
    RoutingTable,
    Target,
    Upstream,
    parse_routing_table,
)
from app.gateway.views import JsonView, parse_object
from app.observability import agent_labels
from app.tracking.genai_metrics import GenAIMetrics, genai_metrics
from app.tracking.operations import CHAT, EMBEDDINGS, RESPONSES, Operation
from app.tracking.streams import ChatStreamState, ResponsesStreamState, StreamState
from app.tracking.tracker import CallContext, CallTracker, complete_shielded, default_tracer

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-asa-request-id"
COST_HEADER = "x-asa-cost-usd"
REMAINING_HEADER = "x-asa-budget-remaining-usd"
SCOPE_HEADER = "x-asa-budget-scope"
TASK_HEADER = "x-asa-task-id"
AGENT_HEADER = "x-asa-agent"
# Client headers worth passing on to an upstream (the client's Authorization never is).
_PASSED_HEADERS = ("openai-beta",)
# Upstream answer headers worth passing back (rate-limit hints for the SDKs' backoff).
_RETURNED_HEADERS = ("retry-after", "retry-after-ms")
# The SDK's exception names, used as a failed call's error.type (as an in-process call's).
_STATUS_ERRORS = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    409: "ConflictError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
}


@dataclass(frozen=True, slots=True)
class Api:
    """One forwarded OpenAI API."""

    path: str
    operation: Operation
    new_state: Callable[[], StreamState] | None  # None: no streaming

    @property
    def is_chat(self) -> bool:
        return self.operation is CHAT


CHAT_API = Api("chat/completions", CHAT, ChatStreamState)
RESPONSES_API = Api("responses", RESPONSES, ResponsesStreamState)
EMBEDDINGS_API = Api("embeddings", EMBEDDINGS, None)


class UpstreamError(Exception):
    """How the last attempt of a call failed (the tracker records it as the call's error)."""


@dataclass(slots=True)
class Failure:
    status: int
    error_type: str
    message: str
    body: bytes | None = None  # the upstream's own error body, passed on (secrets masked)
    headers: dict[str, str] | None = None


@dataclass(slots=True)
class Call:
    """A call admitted by the gateway, on its way upstream."""

    api: Api
    caller: Caller
    body: dict[str, Any]
    raw: bytes
    model: str  # the model the route sends (before a target's own)
    targets: tuple[Target, ...]
    stream: bool
    wants_usage: bool  # a chat stream whose client asked for the usage chunk
    tracker: CallTracker
    reservation: Reservation | None = None

    def body_for(self, target: Target) -> bytes:
        """The bytes sent to ``target``: as received, unless a field must change."""
        model = target.model or self.model
        ask_usage = self.stream and self.api.is_chat and not self.wants_usage
        if model == self.body.get("model") and not ask_usage:
            return self.raw
        body = dict(self.body)
        body["model"] = model
        if ask_usage:
            options = body.get("stream_options")
            base = options if isinstance(options, dict) else {}
            body["stream_options"] = {**base, "include_usage": True}
        return json.dumps(body, separators=(",", ":")).encode()


def status_error_type(status: int) -> str:
    if status >= 500:
        return "InternalServerError"
    return _STATUS_ERRORS.get(status, "APIStatusError")


class Gateway:
    """The running gateway of one service process (``app.state.gateway``)."""

    def __init__(
        self,
        runtime: Runtime,
        access: AccessControl,
        table: RoutingTable,
        *,
        tracer: Tracer | None = None,
        metrics: GenAIMetrics | None = None,
    ) -> None:
        settings = runtime.settings
        self.runtime = runtime
        self.table = table
        self.callers = Callers(access, runtime.session_factory)
        # Clients name their agents: the metrics show that many, the rest as "other".
        agent_labels.limit = settings.gateway_max_agent_labels
        self._timeout = settings.gateway_timeout_seconds
        # One pooled session for every upstream (built in the service's lifespan, in its event
        # loop; closed by ``aclose``). aiohttp, not httpx2: measured in bench/gateway_client.py,
        # it costs a fifth of httpx2's CPU a call, whose pool re-checks every pooled connection
        # at each request and response close (docs/BENCHMARKS.md).
        self.client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1000, limit_per_host=0, keepalive_timeout=30),
            timeout=upstream_timeout(self._timeout),
        )
        self.tracer = tracer or default_tracer()
        self._metrics = metrics
        self._secrets = runtime.secrets
        self._capture = settings.otel_instrumentation_genai_capture_message_content
        self._deprecated = settings.otel_genai_deprecated_attributes

    @classmethod
    def build(cls, runtime: Runtime, access: AccessControl) -> Gateway:
        """The gateway of ``runtime``: its routing table from the settings, its default upstream
        the runtime's own (``OPENAI_BASE_URL``/``OPENAI_API_KEY``, or the simulator). Built after
        the telemetry providers, so it records the same metrics as in-process calls."""
        settings = runtime.settings
        default = Upstream(
            DEFAULT_UPSTREAM,
            runtime.llm_endpoint.rstrip("/"),
            runtime.async_openai_client.api_key,
            settings.llm_provider,
        )
        table = parse_routing_table(settings.gateway_routes_json, default)
        return cls(runtime, access, table, metrics=genai_metrics())

    async def aclose(self) -> None:
        await self.client.close()

    # -- admission --------------------------------------------------------------------------

    def caller(self, request: Request) -> Caller:
        client = request.client
        return self.callers.caller(
            request.headers.get("authorization"),
            client.host if client is not None else None,
            is_forwarded(request.headers),
        )

    async def admit(self, api: Api, request: Request) -> Call:
        """Everything checked before anything is spent; raises ``GatewayError``."""
        caller = self.caller(request)
        raw = await _read_body(request)
        body = parse_object(raw)
        if body is None:
            raise GatewayError(
                400, "The request body must be a JSON object.", code="invalid_request_body"
            )
        requested = body.get("model")
        if not isinstance(requested, str) or not requested.strip():
            raise GatewayError(
                400, "model must be a non-empty string.", code="invalid_model", param="model"
            )
        caller.ensure_model_allowed(requested)
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise GatewayError(400, "stream must be a boolean.", code="invalid_stream")
        stream = bool(stream) and api.new_state is not None
        options = body.get("stream_options")
        wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        task_id = self.callers.task_id(caller, request.headers.get(TASK_HEADER))
        agent = self.callers.agent(request.headers.get(AGENT_HEADER))
        model, targets = self.table.route(requested)
        tracker = self._tracker(api, caller, task_id, agent, body, targets[0], model, stream)
        return Call(api, caller, body, raw, model, targets, stream, wants_usage, tracker)

    def _tracker(
        self,
        api: Api,
        caller: Caller,
        task_id: str | None,
        agent: str | None,
        body: dict[str, Any],
        target: Target,
        model: str,
        stream: bool,
    ) -> CallTracker:
        upstream = target.upstream
        sent_model = target.model or model
        book = self.runtime.price_book
        resolved = book.resolve(sent_model, upstream.provider, upstream.base_url)
        context = GatewayCallContext(
            task_id=task_id,
            user_id=caller.principal.user_id,
            agent=agent,
            provider=resolved.provider,
            capture_content=self._capture,
            secrets=self._secrets,
            deprecated_attributes=self._deprecated,
            key_id=caller.key_id,
        )
        return CallTracker(
            writer=self.runtime.writer,
            price_book=book,
            tracer=self.tracer,
            context=context,
            model=sent_model,
            request=body,
            is_stream=stream,
            operation=api.operation,
            provider_setting=upstream.provider,
            endpoint_url=upstream.base_url,
            metrics=self._metrics,
            attempts=[0],
        )

    def start(self, call: Call, request: Request) -> None:
        """Start the call's span: a child of the request's span, or of the client's
        ``traceparent`` when no server span is current."""
        token = None
        if "traceparent" in request.headers and not (
            trace.get_current_span().get_span_context().is_valid
        ):
            token = otel_context.attach(propagate.extract(dict(request.headers)))
        try:
            call.tracker.start()
        finally:
            if token is not None:
                otel_context.detach(token)

    async def reserve(self, call: Call) -> None:
        """Reserve the call's budget (as ``AsyncLLMClient`` does); a refusal is recorded as a
        blocked call and raised as a 402 (or 503) ``GatewayError``: nothing was sent."""
        guard = self.runtime.budget_guard
        if guard is None:
            return
        tracker, worker = call.tracker, self.runtime.db_worker
        try:
            reservation = guard.reserve_nowait(context=tracker.context)
        except Exception:
            reservation = None
        request = call.api.operation.budget_request(call.body) if reservation is None else None
        if request is not None:
            # The service's writer process takes it (outside this process's GIL) if it can...
            reservation = await guard.reserve_in_writer(
                worker, context=tracker.context, model=tracker.model, request=request
            )
        if reservation is None and request is not None:
            # ... else the tracking thread, which also decides a refusal or an outage.
            try:
                with anyio.CancelScope(shield=True):
                    reservation = await worker.call_async(
                        lambda: guard.reserve(
                            context=tracker.context, model=tracker.model, request=request
                        ),
                        abandoned=guard.give_back_held,  # a caller cancelled meanwhile
                    )
            except AppError as exc:
                await complete_shielded(
                    tracker, tracker.outcome(tracker.blocked_outcome, exc), worker
                )
                raise from_app_error(exc) from None
        call.reservation = reservation
        if reservation is not None and reservation.held:
            tracker.settle = lambda tx, record: guard.settle(reservation, record, tx)

    # -- forwarding ---------------------------------------------------------------------------

    def _aim(self, call: Call, target: Target) -> None:
        """Point the tracker at the target about to be tried (its provider, model, prices)."""
        tracker, upstream = call.tracker, target.upstream
        model = target.model or call.model
        if tracker.endpoint_url == upstream.base_url and tracker.model == model:
            return
        tracker.model = model
        tracker.endpoint_url = upstream.base_url
        tracker.provider_setting = upstream.provider
        resolved = self.runtime.price_book.resolve(model, upstream.provider, upstream.base_url)
        tracker.context.provider = resolved.provider

    def _headers(self, call: Call, upstream: Upstream, request: Request) -> dict[str, str]:
        headers = {
            "authorization": f"Bearer {upstream.api_key}",
            "content-type": "application/json",
            "accept-encoding": "identity",
        }
        for name in _PASSED_HEADERS:
            value = request.headers.get(name)
            if value is not None:
                headers[name] = value
        span = call.tracker.span
        if span is not None:
            propagate.inject(headers, context=trace.set_span_in_context(span))
        return headers

    async def send(
        self, call: Call, request: Request, targets: tuple[Target, ...]
    ) -> tuple[aiohttp.ClientResponse, Target] | Failure:
        """Try ``targets`` in order: the first answer that is not 429/5xx/timeout/dropped, its
        headers read (its body still to read), or the last failure."""
        failure = Failure(502, "APIConnectionError", "No upstream was tried.")
        for target in targets:
            self._aim(call, target)
            call.tracker.attempts[0] += 1
            upstream = target.upstream
            timeout = upstream.timeout_seconds or self._timeout
            try:
                response = await self.client.post(
                    f"{upstream.base_url}/{call.api.path}",
                    data=call.body_for(target),
                    headers=self._headers(call, upstream, request),
                    timeout=upstream_timeout(timeout),
                )
            except TimeoutError:  # aiohttp's timeouts are TimeoutErrors (and ClientErrors)
                failure = _timeout_failure(upstream)
                continue
            except aiohttp.ClientError as exc:
                failure = _connection_failure(upstream, exc)
                continue
            status = response.status
            if status == 429 or status >= 500:
                failure = await self._status_failure(response)
                continue
            return response, target
        return failure

    async def _status_failure(self, response: aiohttp.ClientResponse) -> Failure:
        return self.failure_of(response, await read_quietly(response))

    def failure_of(self, response: aiohttp.ClientResponse, body: bytes | None) -> Failure:
        status = response.status
        parsed = parse_object(body) if body else None
        error = parsed.get("error") if parsed is not None else None
        message = error.get("message") if isinstance(error, dict) else None
        headers = {n: response.headers[n] for n in _RETURNED_HEADERS if n in response.headers}
        return Failure(
            status,
            status_error_type(status),
            str(message) if message else f"The upstream answered HTTP {status}.",
            body,
            headers or None,
        )

    async def read(self, response: aiohttp.ClientResponse, target: Target) -> bytes | Failure:
        """The whole body of a plain (non-stream) answer, or how reading it failed."""
        try:
            return await response.read()
        except TimeoutError:
            return _timeout_failure(target.upstream)
        except aiohttp.ClientError as exc:
            return _connection_failure(target.upstream, exc)
        finally:
            finish(response)

    async def _answer(
        self, call: Call, request: Request
    ) -> tuple[aiohttp.ClientResponse, Target, bytes] | Failure:
        """A non-stream answer, read whole; a body that fails to arrive moves on to the next
        target as a failed attempt does."""
        targets = call.targets
        failure = Failure(502, "APIConnectionError", "No upstream was tried.")
        while targets:
            result = await self.send(call, request, targets)
            if isinstance(result, Failure):
                return result
            response, target = result
            data = await self.read(response, target)
            if not isinstance(data, Failure):
                return response, target, data
            failure = data
            targets = targets[targets.index(target) + 1 :]
        return failure

    async def forward_plain(self, call: Call, request: Request) -> Response:
        """A non-stream call: record the row, answer with the upstream's body and the
        accounting headers."""
        tracker, worker = call.tracker, self.runtime.db_worker
        result = await self._answer(call, request)
        if isinstance(result, Failure):
            await self.record_failure(call, result)
            return self.failure_response(result, call)
        response, target, data = result
        status = response.status
        flags = (f"upstream:{target.upstream.name}",)
        if status >= 400:
            failure = self.failure_of(response, data)
            await self.record_failure(call, failure)
            return self.failure_response(failure, call)
        parsed = parse_object(data)
        if parsed is None:
            outcome = tracker.outcome(
                tracker.error_outcome,
                UpstreamError("The upstream's answer is not a JSON object."),
                error_type="APIResponseValidationError",
            )
        else:
            outcome = tracker.outcome(
                tracker.success_outcome,
                call.api.operation.fields(JsonView(parsed)),
                extra_flags=flags,
            )
        await complete_shielded(tracker, outcome, worker)
        headers = {REQUEST_ID_HEADER: tracker.request_id}
        if outcome is not None:
            headers[COST_HEADER] = format(outcome.record.cost_usd, "f")
        headers.update(await self.remaining_headers(call))
        content_type = response.headers.get("content-type", "application/json")
        return Response(data, status_code=status, headers=headers, media_type=content_type)

    async def record_failure(self, call: Call, failure: Failure) -> None:
        tracker = call.tracker
        outcome = tracker.outcome(
            tracker.error_outcome, UpstreamError(failure.message), error_type=failure.error_type
        )
        await complete_shielded(tracker, outcome, self.runtime.db_worker)

    def failure_response(self, failure: Failure, call: Call) -> Response:
        """The last attempt's failure as the client sees it: the upstream's error body (its
        secrets masked), or an OpenAI-shaped one the gateway writes."""
        headers = {REQUEST_ID_HEADER: call.tracker.request_id, **(failure.headers or {})}
        if failure.body and parse_object(failure.body) is not None:
            text = redact(failure.body.decode("utf-8", "replace"), self._secrets)
            return Response(text, failure.status, headers=headers, media_type="application/json")
        body = error_body(failure.message, code=failure.error_type, type_="upstream_error")
        return Response(
            json.dumps(body), failure.status, headers=headers, media_type="application/json"
        )

    async def remaining_headers(self, call: Call) -> dict[str, str]:
        """What is left of the tightest limit that applies to the call (nothing when none)."""
        reservation = call.reservation
        if reservation is None or not any(
            limit.limit_pico is not None for limit in reservation.limits.values()
        ):
            return {}
        engine = self.runtime.engine

        def read() -> tuple[str, Decimal] | None:
            keys = counter_keys(
                reservation.task_id,
                reservation.user_id,
                reservation.window_day,
                reservation.key_id,
            )
            tightest: tuple[str, int] | None = None
            with engine.connect() as conn:
                for key in keys:
                    limit = reservation.limits.get(key.scope)
                    if limit is None or limit.limit_pico is None:
                        continue
                    state = budget_store.read_counter(conn, key) or budget_store.CounterState()
                    left = max(limit.limit_pico - state.spent_pico - state.reserved_pico, 0)
                    if tightest is None or left < tightest[1]:
                        tightest = (key.scope.value, left)
            return None if tightest is None else (tightest[0], pico_to_usd(tightest[1]))

        try:
            found = await self.runtime.db_worker.call_async(read)
        except Exception:
            logger.warning("Could not read the remaining budget", exc_info=True)
            return {}
        if found is None:
            return {}
        return {REMAINING_HEADER: format(found[1], "f"), SCOPE_HEADER: found[0]}


@dataclass
class GatewayCallContext(CallContext):
    """A call's context with the ASA key it was made with (the ``key`` budget scope's
    subject)."""

    key_id: str | None = None


def upstream_timeout(seconds: float) -> aiohttp.ClientTimeout:
    """``seconds`` for connecting and between two reads (no limit on a whole stream)."""
    return aiohttp.ClientTimeout(total=None, connect=seconds, sock_read=seconds)


def finish(response: aiohttp.ClientResponse) -> None:
    """Done with ``response``: its connection back to the pool when its body was read to the
    end, else closed (which is what stops an upstream whose client went away)."""
    if response.content.at_eof():
        response.release()
    else:
        response.close()


async def read_quietly(response: aiohttp.ClientResponse) -> bytes | None:
    """An error answer's body, or None when it could not be read; the response finished."""
    try:
        return await response.read()
    except (aiohttp.ClientError, TimeoutError):
        return None
    finally:
        finish(response)


def _timeout_failure(upstream: Upstream) -> Failure:
    return Failure(
        504, "APITimeoutError", f"The upstream {upstream.name!r} did not answer in time."
    )


def _connection_failure(upstream: Upstream, exc: Exception) -> Failure:
    return Failure(
        502,
        "APIConnectionError",
        f"The connection to the upstream {upstream.name!r} failed ({type(exc).__name__}).",
    )


async def _read_body(request: Request) -> bytes:
    try:
        return await request.body()
    except ClientDisconnect:
        raise GatewayError(400, "The client went away.", code="client_disconnected") from None
    except Exception as exc:  # Starlette's body limit raises an HTTPException(413)
        if getattr(exc, "status_code", None) == 413:
            raise GatewayError(
                413, "The request body is too large.", code="request_too_large"
            ) from None
        raise
