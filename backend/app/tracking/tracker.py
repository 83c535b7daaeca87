"""What happens around one LLM call: usage extraction, pricing, the row, the span, the metrics.

``CallTracker`` is shared by the sync and async clients and by the three APIs (the
``Operation`` says how to read each one). Its ``finish_*`` methods run once per logical call,
whatever the outcome, and never raise: a failure inside tracking is logged, counted in
``llm_tracking_errors_total`` and swallowed, so instrumentation never changes what the caller
sees.

Spans follow the OpenTelemetry GenAI conventions v1.41.1 (``app.tracking.semconv``): name
``{gen_ai.operation.name} {gen_ai.request.model}``, kind CLIENT, the sampling-relevant
attributes at creation, usage attributes only for counts the provider reported, and the seed's
``llm.*`` attributes beside them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from opentelemetry import trace
from opentelemetry.environment_variables import OTEL_PYTHON_TRACER_PROVIDER
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from sqlalchemy.exc import SQLAlchemyError

from app.core.prepared import Tx
from app.core.redaction import safe_error_message
from app.models import new_id
from app.observability import (
    LLM_COST,
    LLM_LATENCY,
    LLM_REQUESTS,
    LLM_RETRIES,
    LLM_TOKENS,
    LLM_UNPRICED,
    TRACKING_ERRORS,
    agent_label,
    labelled,
    model_label,
)
from app.tracking import semconv as sc
from app.tracking.content import content_attributes, output_attributes
from app.tracking.genai_metrics import GenAIMetrics
from app.tracking.operations import (
    ABSURD_TOKEN_COUNT,
    CHAT,
    Operation,
    ResponseFields,
    UsageReading,
    estimate_prompt_tokens,
    estimate_tokens,
    read_usage,
)
from app.tracking.pricing import UNPRICED_COST, PriceBook, PricedTerms, TokenUsage
from app.tracking.providers import DEFAULT_PROVIDER, Endpoint
from app.tracking.record import UsageRecord
from app.tracking.writer import UsageWriter

if TYPE_CHECKING:
    from app.tracking.db_worker import DbWorker

__all__ = [
    "ABSURD_TOKEN_COUNT",
    "CallContext",
    "CallTracker",
    "Outcome",
    "estimate_prompt_tokens",
    "estimate_tokens",
    "prompt_fragments",
]

logger = logging.getLogger(__name__)

MIN_FRAGMENT_CHARS = 12  # shorter prompt lines are not masked on their own in error messages
# The priced terms (cost, status, source, entry, tier) of a call that billed nothing.
NOTHING_BILLED: PricedTerms = (0, "priced", None, None, None)


class SpoolableReservation(Protocol):
    """A budget reservation as the spool keeps it (``app.budgets.guard.Reservation``)."""

    def to_json(self) -> dict[str, Any]: ...


@dataclass
class CallContext:
    """Who a call is for; ids go to rows and spans, never to metric labels.

    ``reservation`` is set by the budget guard when the call holds one: if the database cannot
    take the call's row, the row is spooled with it and the replay settles it.
    """

    task_id: str | None = None
    user_id: str | None = None
    agent: str | None = None
    provider: str = DEFAULT_PROVIDER  # the resolved gen_ai.provider.name of the call
    capture_content: bool = False
    secrets: tuple[str, ...] = ()
    deprecated_attributes: bool = False  # also emit gen_ai.system
    reservation: SpoolableReservation | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a call ended: its row, the span attributes it adds, the error it raised."""

    record: UsageRecord
    attrs: dict[str, Any]
    error: BaseException | None
    error_type: str | None = None  # error.type when it is not the exception's class name
    usage: UsageReading | None = None  # what the provider reported (None: nothing)


@dataclass
class CallTracker:
    """Tracks one logical call from before the request to its recorded row."""

    writer: UsageWriter
    price_book: PriceBook
    tracer: Tracer
    context: CallContext
    model: str
    request: Mapping[str, Any]
    is_stream: bool = False
    operation: Operation = CHAT
    provider_setting: str | None = None  # the explicit provider, if any (else resolved)
    endpoint_url: str | None = None
    metrics: GenAIMetrics | None = None
    request_id: str = field(default_factory=new_id)
    attempts: list[int] = field(default_factory=lambda: [0])
    span: Span | None = None
    started: float = 0.0
    first_chunk_at: float | None = None
    finished: bool = False
    response_model: str | None = None
    # Settles the call's budget reservation with its final record: given the usage write's
    # connection it joins that transaction (one commit for both); given None it runs alone.
    settle: Callable[[Tx | None, UsageRecord], None] | None = None

    def start(self) -> None:
        self.started = time.perf_counter()
        if _is_noop(self.tracer):
            return  # tracing is off: no span to build attributes for
        try:
            self.span = self.tracer.start_span(
                f"{self.operation.span_operation} {self.model}",
                kind=SpanKind.CLIENT,
                attributes=self._request_attributes(),
            )
        except Exception:
            TRACKING_ERRORS.labels("span").inc()
            logger.exception("Could not start the LLM span")

    @property
    def endpoint(self) -> Endpoint | None:
        return self.price_book.endpoint(self.endpoint_url)

    def _request_attributes(self) -> dict[str, Any]:
        provider = self.context.provider
        attrs: dict[str, Any] = {
            sc.GEN_AI_OPERATION_NAME: self.operation.span_operation,
            sc.GEN_AI_PROVIDER_NAME: provider,
            sc.GEN_AI_REQUEST_MODEL: self.model,
            sc.LLM_MODEL: self.model,
            sc.LLM_REQUEST_ID: self.request_id,
            sc.LLM_STREAM: self.is_stream,
        }
        if self.context.deprecated_attributes:
            attrs[sc.GEN_AI_SYSTEM] = provider
        if self.operation.api_type is not None:
            attrs[sc.OPENAI_API_TYPE] = self.operation.api_type
        endpoint = self.endpoint
        if endpoint is not None and endpoint.address:
            attrs[sc.SERVER_ADDRESS] = endpoint.address
            if endpoint.port is not None:
                attrs[sc.SERVER_PORT] = endpoint.port
        for key, attr in (
            ("task_id", sc.LLM_TASK_ID),
            ("user_id", sc.LLM_USER_ID),
            ("agent", sc.LLM_AGENT),
        ):
            value = getattr(self.context, key)
            if value:
                attrs[attr] = value
        attrs.update(self.operation.request_attributes(self.request))
        if self.context.capture_content:
            attrs.update(content_attributes(self.operation, self.request))
        return attrs

    @property
    def trace_ids(self) -> tuple[str | None, str | None]:
        if self.span is None:
            return None, None
        ctx = self.span.get_span_context()
        if not ctx.is_valid:
            return None, None
        return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")

    # -- outcomes -------------------------------------------------------------------------

    def finish_success(self, fields: ResponseFields) -> UsageRecord | None:
        """Record a call that returned; never raises."""
        return self.complete(self.outcome(self.success_outcome, fields))

    def finish_error(self, exc: BaseException, **fields: Any) -> UsageRecord | None:
        """Record a call that failed (``error_outcome``'s fields); never raises."""
        return self.complete(self.outcome(self.error_outcome, exc, **fields))

    def finish_blocked(self, exc: BaseException) -> UsageRecord | None:
        """Record a call its budget refused before it was made; never raises."""
        return self.complete(self.outcome(self.blocked_outcome, exc))

    def outcome(self, build: Callable[..., Outcome], *args: Any, **fields: Any) -> Outcome | None:
        """``build(*args, **fields)``, or None (logged and counted) if tracking itself fails."""
        try:
            return build(*args, **fields)
        except Exception:
            TRACKING_ERRORS.labels("record").inc()
            logger.exception("Could not build the usage record of %s", self.request_id)
            return None

    def _price(
        self, tokens: TokenUsage, *, estimated: bool = False, service_tier: str | None = None
    ) -> PricedTerms:
        """The cost of ``tokens`` in pico-dollars with its status and provenance (source ref,
        entry, tier): from the price book's integer terms of this model (cached per model,
        provider, endpoint and tier), or from ``quote`` where only genai-prices' own
        calculation is exact. The two agree on every count (``tests/prices``)."""
        book, tier = self.price_book, self._service_tier(service_tier)
        p, c = tokens.prompt_tokens, tokens.completion_tokens
        terms = book.terms(
            self.model,
            provider=self.provider_setting,
            endpoint=self.endpoint_url,
            service_tier=tier,
        )
        if terms is not None:
            priced = terms.price(p, c, tokens.cached_tokens, tokens.reasoning_tokens, estimated)
            if priced is not None:
                return priced
        return book.quote(
            self.model,
            tokens,
            estimated=estimated,
            provider=self.provider_setting,
            endpoint=self.endpoint_url,
            service_tier=tier,
        ).terms()

    def _service_tier(self, reported: str | None) -> str | None:
        """The tier the call ran in: the provider's answer, else the one asked for."""
        if isinstance(reported, str) and reported:
            return reported[:16]
        asked = self.request.get("service_tier")
        return asked[:16] if isinstance(asked, str) and asked and asked != "auto" else None

    def success_outcome(
        self, fields: ResponseFields, *, partial: bool = False, extra_flags: Sequence[str] = ()
    ) -> Outcome:
        if fields.failure is not None:
            # A 200 answer that reports a failure (a Responses API stream's response.failed).
            return self.error_outcome(
                None,
                partial_usage=fields.usage,
                output_text=fields.text,
                error_type=fields.failure,
                response_model=fields.model,
            )
        reading = read_usage(fields.usage, reports_output=self.operation.reports_output)
        tokens, flags = reading.tokens, reading.flags
        estimated = False
        if "usage_missing" in flags:
            # No usage from the provider (stream closed early, or an endpoint that omits it).
            tokens = TokenUsage(
                prompt_tokens=self.operation.estimate_prompt_tokens(self.request),
                completion_tokens=(
                    estimate_tokens(fields.text) if self.operation.reports_output else 0
                ),
            )
            estimated = True
        flags.extend(extra_flags)
        priced = (
            UNPRICED_COST  # absurd counts: never billed, never guessed
            if "absurd_tokens" in flags
            else self._price(tokens, estimated=estimated, service_tier=fields.service_tier)
        )
        self.response_model = fields.model
        record = self._record(
            status="success",
            tokens=tokens,
            priced=priced,
            service_tier=self._service_tier(fields.service_tier),
            response_model=fields.model,
            finish_reason=",".join(fields.finish_reasons) or None,
            partial=partial,
            flags=flags,
        )
        if self.span is None:
            return Outcome(record, {}, None, usage=reading)  # no span to describe it on
        attrs: dict[str, Any] = {}
        if self.operation.span_operation == sc.OPERATION_CHAT:
            attrs[sc.GEN_AI_RESPONSE_FINISH_REASONS] = list(fields.finish_reasons)
        if fields.model:
            attrs[sc.GEN_AI_RESPONSE_MODEL] = fields.model
        if fields.id:
            attrs[sc.GEN_AI_RESPONSE_ID] = fields.id
        if fields.system_fingerprint:
            attrs[sc.OPENAI_RESPONSE_SYSTEM_FINGERPRINT] = fields.system_fingerprint
        if fields.service_tier:
            attrs[sc.OPENAI_RESPONSE_SERVICE_TIER] = fields.service_tier
        if self.is_stream and self.first_chunk_at is not None:
            attrs[sc.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] = self.first_chunk_at - self.started
        if self.context.capture_content:
            attrs.update(output_attributes(self.operation, fields))
        return Outcome(record, attrs, None, usage=reading)

    def error_outcome(
        self,
        exc: BaseException | None,
        *,
        partial_usage: Any = None,
        output_text: str = "",
        error_type: str | None = None,
        response_model: str | None = None,
    ) -> Outcome:
        reading = read_usage(partial_usage, reports_output=self.operation.reports_output)
        tokens, flags = reading.tokens, reading.flags
        priced = NOTHING_BILLED
        if partial_usage is not None:
            priced = self._price(tokens)
        elif output_text:
            # A stream that broke after content arrived: the tokens were produced and billed.
            tokens = TokenUsage(
                prompt_tokens=self.operation.estimate_prompt_tokens(self.request),
                completion_tokens=estimate_tokens(output_text),
            )
            priced = self._price(tokens, estimated=True)
        else:
            flags = []
        kind = error_type or type(exc).__name__
        message = (
            safe_error_message(exc, self._error_secrets())
            if exc is not None
            else f"The provider reported a failure: {kind}"
        )
        record = self._record(
            status="error",
            tokens=tokens,
            priced=priced,
            service_tier=self._service_tier(None),
            response_model=response_model,
            partial=bool(output_text) or partial_usage is not None,
            flags=flags,
            error_type=kind[:100],
            error_message=message,
        )
        usage = reading if partial_usage is not None else None
        return Outcome(record, {}, exc, error_type=kind, usage=usage)

    def blocked_outcome(self, exc: BaseException) -> Outcome:
        record = self._record(
            status="blocked",
            tokens=TokenUsage(),
            priced=NOTHING_BILLED,
            error_type=type(exc).__name__,
            error_message=safe_error_message(exc, self._error_secrets()),
        )
        return Outcome(record, {}, exc)

    # -- completion: the row (and the budget's settlement), then metrics and the span ------

    def complete(self, outcome: Outcome | None) -> UsageRecord | None:
        """Persist the outcome's row in this thread, then observe it. Once per call."""
        if not self._claim(outcome):
            return None
        assert outcome is not None
        record, joined = outcome.record, self._joined_settle(outcome.record)
        try:
            written = self.writer.write(record, also=joined, settlement=self._settlement())
            settled = written.also_committed or written.settlement_spooled
        except Exception:
            TRACKING_ERRORS.labels("write").inc()
            logger.exception("Could not persist or spool usage row %s", record.request_id)
            settled = False
        if self.settle is not None and not settled:
            self._settle_alone(record)
        self._observe_outcome(outcome)
        return record

    async def complete_async(self, outcome: Outcome | None, worker: DbWorker) -> UsageRecord | None:
        """``complete`` for an event loop: the row goes through ``worker`` (batched with the
        rows of concurrent calls); metrics and the span are done on the loop."""
        if not self._claim(outcome):
            return None
        assert outcome is not None
        record, joined = outcome.record, self._joined_settle(outcome.record)
        try:
            written = await worker.write_async(record, joined, self._settlement())
            settled = written.also_committed or written.settlement_spooled
        except Exception:
            TRACKING_ERRORS.labels("write").inc()
            logger.exception("Could not persist or spool usage row %s", record.request_id)
            settled = False
        if self.settle is not None and not settled:
            await asyncio.wrap_future(worker.call(lambda: self._settle_alone(record)))
        self._observe_outcome(outcome)
        return record

    def _claim(self, outcome: Outcome | None) -> bool:
        if self.finished:
            return False
        self.finished = True
        if outcome is None:
            self._end_span_quietly()
            return False
        return True

    def _joined_settle(self, record: UsageRecord) -> Callable[[Tx], None] | None:
        settle = self.settle
        if settle is None:
            return None

        def joined(tx: Tx) -> None:
            settle(tx, record)

        return joined

    def _settlement(self) -> dict[str, Any] | None:
        """The call's reservation as the spool keeps it, if the call must settle one."""
        reservation = self.context.reservation
        if self.settle is None or reservation is None:
            return None
        return reservation.to_json()

    def _settle_alone(self, record: UsageRecord) -> None:
        assert self.settle is not None
        try:
            self.settle(None, record)
        except SQLAlchemyError as exc:
            # The database went away between the row and its settlement: spool the settlement
            # with the row (the replay inserts the row once and settles the reservation).
            settlement = self._settlement()
            if settlement is None:
                TRACKING_ERRORS.labels("settle").inc()
                logger.warning("Could not settle the reservation of %s: %s", record.request_id, exc)
                return
            try:
                self.writer.spool_row(record, settlement, row_written=True)
            except Exception:
                TRACKING_ERRORS.labels("settle").inc()
                logger.exception("Could not spool the settlement of %s", record.request_id)
        except Exception:
            TRACKING_ERRORS.labels("settle").inc()
            logger.exception("Could not settle the budget reservation of %s", record.request_id)

    def _observe_outcome(self, outcome: Outcome) -> None:
        try:
            self._observe(outcome)
        except Exception:
            TRACKING_ERRORS.labels("metrics").inc()
            logger.exception("Could not update LLM metrics")
        try:
            self._end_span(outcome)
        except Exception:
            TRACKING_ERRORS.labels("span").inc()
            logger.exception("Could not end the LLM span")

    def _end_span_quietly(self) -> None:
        try:
            if self.span is not None:
                self.span.end()
        except Exception:
            TRACKING_ERRORS.labels("span").inc()

    # -- internals ------------------------------------------------------------------------

    def _error_secrets(self) -> tuple[str, ...]:
        return (*self.context.secrets, *fragments_of(self.operation.prompt_texts(self.request)))

    def _record(
        self,
        *,
        status: str,
        tokens: TokenUsage,
        priced: PricedTerms,
        service_tier: str | None = None,
        response_model: str | None = None,
        finish_reason: str | None = None,
        partial: bool = False,
        flags: Sequence[str] = (),
        error_type: str | None = None,
        error_message: str | None = None,
    ) -> UsageRecord:
        trace_id, span_id = self.trace_ids
        cost_pico, cost_status, price_source, price_entry, price_tier = priced
        return UsageRecord(
            request_id=self.request_id,
            model=self.model,
            status=status,
            task_id=self.context.task_id,
            user_id=self.context.user_id,
            agent=self.context.agent,
            provider=self.context.provider,
            operation=self.operation.name,
            response_model=response_model,
            prompt_tokens=tokens.prompt_tokens,
            completion_tokens=tokens.completion_tokens,
            cached_tokens=tokens.cached_tokens,
            reasoning_tokens=tokens.reasoning_tokens,
            cost_pico_usd=cost_pico,
            cost_status=cost_status,
            price_source=price_source,
            price_entry=price_entry,
            price_tier=price_tier,
            service_tier=service_tier,
            latency_ms=(time.perf_counter() - self.started) * 1000.0,
            is_stream=self.is_stream,
            is_partial=partial,
            attempts=max(self.attempts[0], 1),
            finish_reason=finish_reason[:64] if finish_reason else None,
            error_type=error_type,
            error_message=error_message,
            flags=",".join(flags)[:200] or None,
            trace_id=trace_id,
            span_id=span_id,
        )

    def _observe(self, outcome: Outcome) -> None:
        record = outcome.record
        model = model_label(record.model)
        agent = agent_label(record.agent)
        labelled(LLM_REQUESTS, model, record.status, agent).inc()
        if record.status == "blocked":
            return
        exemplar = {"trace_id": record.trace_id} if record.trace_id else None
        labelled(LLM_LATENCY, model).observe(record.latency_ms / 1000.0, exemplar=exemplar)
        for token_type, count in (
            ("prompt", record.prompt_tokens),
            ("completion", record.completion_tokens),
            ("cached", record.cached_tokens),
            ("reasoning", record.reasoning_tokens),
        ):
            if count:
                labelled(LLM_TOKENS, model, token_type, agent).inc(count)
        if record.cost_pico_usd:
            labelled(LLM_COST, model, agent).inc(record.cost_usd_float, exemplar=exemplar)
        if record.cost_status == "unpriced":
            labelled(LLM_UNPRICED, model).inc()
        if record.attempts > 1:
            labelled(LLM_RETRIES, model).inc(record.attempts - 1)
        if self.metrics is not None:
            endpoint = self.endpoint
            usage = outcome.usage
            self.metrics.record(
                operation=self.operation.span_operation,
                provider=record.provider,
                request_model=record.model,
                response_model=record.response_model,
                address=endpoint.address if endpoint else None,
                port=endpoint.port if endpoint else None,
                duration_s=record.latency_ms / 1000.0,
                error_type=outcome.error_type
                or (type(outcome.error).__name__ if outcome.error is not None else None),
                input_tokens=(
                    usage.tokens.prompt_tokens if usage is not None and usage.input_known else None
                ),
                output_tokens=(
                    usage.tokens.completion_tokens
                    if usage is not None and usage.output_known and self.operation.reports_output
                    else None
                ),
            )

    def _end_span(self, outcome: Outcome) -> None:
        span = self.span
        if span is None:
            return
        record = outcome.record
        cost = record.cost_usd_float
        usage = {} if outcome.usage is None else _usage_attributes(outcome.usage, self.operation)
        span.set_attributes(
            {
                **outcome.attrs,
                **usage,
                sc.GEN_AI_USAGE_COST: cost,
                sc.LLM_PROMPT_TOKENS: record.prompt_tokens,
                sc.LLM_COMPLETION_TOKENS: record.completion_tokens,
                sc.LLM_TOTAL_TOKENS: record.total_tokens,
                sc.LLM_CACHED_TOKENS: record.cached_tokens,
                sc.LLM_REASONING_TOKENS: record.reasoning_tokens,
                sc.LLM_COST_USD: cost,
                sc.LLM_COST_STATUS: record.cost_status,
                sc.LLM_LATENCY_MS: record.latency_ms,
                sc.LLM_STATUS: record.status,
                sc.LLM_ATTEMPTS: record.attempts,
            }
        )
        if record.is_partial:
            span.set_attribute(sc.LLM_PARTIAL, True)
        if record.status != "success":
            kind = outcome.error_type or type(outcome.error).__name__
            span.set_attribute(sc.ERROR_TYPE, kind)
            span.set_status(Status(StatusCode.ERROR, record.error_message or kind))
        span.end()


def _usage_attributes(reading: UsageReading, operation: Operation) -> dict[str, Any]:
    """The GenAI usage attributes of the counts the provider reported (absent, not 0, when
    it reported none)."""
    tokens = reading.tokens
    attrs: dict[str, Any] = {}
    if reading.input_known:
        attrs[sc.GEN_AI_USAGE_INPUT_TOKENS] = tokens.prompt_tokens
    if not operation.reports_output:
        return attrs
    if reading.output_known:
        attrs[sc.GEN_AI_USAGE_OUTPUT_TOKENS] = tokens.completion_tokens
    if reading.cached_known:
        attrs[sc.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] = tokens.cached_tokens
    if reading.reasoning_known:
        attrs[sc.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS] = tokens.reasoning_tokens
    return attrs


async def complete_shielded(
    tracker: CallTracker, outcome: Outcome | None, worker: DbWorker
) -> None:
    """Record the outcome off the event loop, even if the caller is being cancelled."""
    with anyio.CancelScope(shield=True):
        await tracker.complete_async(outcome, worker)


def fragments_of(texts: Sequence[str]) -> tuple[str, ...]:
    """The texts, their longer lines and their JSON-escaped forms."""
    fragments: list[str] = []
    for text in texts:
        if not text.strip():
            continue
        lines = [line.strip() for line in text.splitlines()]
        for fragment in (text, *(line for line in lines if len(line) >= MIN_FRAGMENT_CHARS)):
            fragments.extend((fragment, json.dumps(fragment)[1:-1]))
    return tuple(fragments)


def prompt_fragments(messages: Any) -> tuple[str, ...]:
    """The request's message texts, their longer lines and their JSON-escaped forms: what a
    provider may quote back in an error, masked there like a secret (the prompt is the
    caller's; it has no business in an error row, a span status or a log line)."""
    if not isinstance(messages, list | tuple):
        return ()
    return fragments_of(CHAT.prompt_texts({"messages": messages}))


_MISSING = object()
# Read once, as OpenTelemetry itself reads it (on the first ``get_tracer_provider``).
_PROVIDER_FROM_ENV = OTEL_PYTHON_TRACER_PROVIDER in os.environ


def _is_noop(tracer: Tracer) -> bool:
    """True for a tracer that can only ever make invalid, non-recording spans."""
    if isinstance(tracer, trace.NoOpTracer):
        return True
    if not isinstance(tracer, trace.ProxyTracer):
        return False
    # No provider set: ``get_tracer_provider`` would look the environment up on every call.
    installed = getattr(trace, "_TRACER_PROVIDER", _MISSING)
    if installed is None and not _PROVIDER_FROM_ENV:
        return True
    return isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def default_tracer() -> Tracer:
    return trace.get_tracer("app.tracking.llm_client")
