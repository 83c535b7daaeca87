"""What happens around one LLM call: usage extraction, pricing, the row, the span, the metrics.

``CallTracker`` is shared by the sync and async clients. Its ``finish_*`` methods run once per
logical call, whatever the outcome, and never raise: a failure inside tracking is logged,
counted in ``llm_tracking_errors_total`` and swallowed, so instrumentation never changes what
the caller sees.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from app.core.money import usd_to_pico
from app.core.prepared import Tx
from app.core.redaction import safe_error_message
from app.observability import (
    LLM_COST,
    LLM_LATENCY,
    LLM_REQUESTS,
    LLM_RETRIES,
    LLM_TOKENS,
    LLM_UNPRICED,
    TRACKING_ERRORS,
    agent_label,
    model_label,
)
from app.tracking.pricing import PriceBook, TokenUsage
from app.tracking.record import UsageRecord
from app.tracking.writer import UsageWriter

if TYPE_CHECKING:
    from app.tracking.db_worker import DbWorker

logger = logging.getLogger(__name__)

# A single call reporting more than this many tokens is treated as a provider bug, not billed.
ABSURD_TOKEN_COUNT = 50_000_000
_CHARS_PER_TOKEN = 4
MIN_FRAGMENT_CHARS = 12  # shorter prompt lines are not masked on their own in error messages


@dataclass
class CallContext:
    """Who a call is for; ids go to rows and spans, never to metric labels."""

    task_id: str | None = None
    user_id: str | None = None
    agent: str | None = None
    provider: str = "openai"
    capture_content: bool = False
    secrets: tuple[str, ...] = ()


def estimate_tokens(text: str) -> int:
    """A rough token count (4 characters a token), used only when the provider sent none."""
    return (len(text) + _CHARS_PER_TOKEN - 1) // _CHARS_PER_TOKEN


def estimate_prompt_tokens(messages: Sequence[Any]) -> int:
    total = 0
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        total += 4 + estimate_tokens(
            content if isinstance(content, str) else json.dumps(content, default=str)
        )
    return total


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    return None


def sanitize_usage(raw: Any) -> tuple[TokenUsage, list[str]]:
    """Token counts from an SDK ``CompletionUsage`` (or None), with flags for what was wrong.

    Negative counts become 0 (flag ``negative_tokens``); counts above ABSURD_TOKEN_COUNT are
    discarded (flag ``absurd_tokens``); cached above prompt or reasoning above completion are
    capped (flag ``inconsistent_details``). A flagged row is recorded, never dropped.
    """
    flags: list[str] = []
    if raw is None:
        return TokenUsage(), ["usage_missing"]
    prompt = _int_or_none(getattr(raw, "prompt_tokens", None))
    completion = _int_or_none(getattr(raw, "completion_tokens", None))
    details_in = getattr(raw, "prompt_tokens_details", None)
    details_out = getattr(raw, "completion_tokens_details", None)
    cached = _int_or_none(getattr(details_in, "cached_tokens", None)) or 0
    reasoning = _int_or_none(getattr(details_out, "reasoning_tokens", None)) or 0
    if prompt is None or completion is None:
        flags.append("usage_malformed")
    values = [prompt or 0, completion or 0, cached, reasoning]
    if any(v < 0 for v in values):
        flags.append("negative_tokens")
        values = [max(v, 0) for v in values]
    if any(v > ABSURD_TOKEN_COUNT for v in values):
        flags.append("absurd_tokens")
        values = [0, 0, 0, 0]
    prompt_n, completion_n, cached_n, reasoning_n = values
    if cached_n > prompt_n or reasoning_n > completion_n:
        flags.append("inconsistent_details")
        cached_n, reasoning_n = min(cached_n, prompt_n), min(reasoning_n, completion_n)
    return TokenUsage(prompt_n, completion_n, cached_n, reasoning_n), flags


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a call ended: its row, the span attributes it adds, the error it raised."""

    record: UsageRecord
    attrs: dict[str, Any]
    error: BaseException | None


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
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    attempts: list[int] = field(default_factory=lambda: [0])
    span: Span | None = None
    started: float = 0.0
    finished: bool = False
    # Settles the call's budget reservation with its final record: given the usage write's
    # connection it joins that transaction (one commit for both); given None it runs alone.
    settle: Callable[[Tx | None, UsageRecord], None] | None = None

    def start(self) -> None:
        self.started = time.perf_counter()
        if _is_noop(self.tracer):
            return  # tracing is off: no span to build attributes for
        try:
            self.span = self.tracer.start_span(
                f"chat {self.model}", kind=SpanKind.CLIENT, attributes=self._request_attributes()
            )
        except Exception:
            TRACKING_ERRORS.labels("span").inc()
            logger.exception("Could not start the LLM span")

    def _request_attributes(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.system": self.context.provider,
            "gen_ai.provider.name": self.context.provider,
            "gen_ai.request.model": self.model,
            "llm.model": self.model,
            "llm.request_id": self.request_id,
            "llm.stream": self.is_stream,
        }
        for key, attr in (
            ("task_id", "llm.task_id"),
            ("user_id", "llm.user_id"),
            ("agent", "llm.agent"),
        ):
            value = getattr(self.context, key)
            if value:
                attrs[attr] = value
        for param, attr in (
            ("temperature", "gen_ai.request.temperature"),
            ("top_p", "gen_ai.request.top_p"),
            ("max_tokens", "gen_ai.request.max_tokens"),
            ("max_completion_tokens", "gen_ai.request.max_tokens"),
            ("n", "gen_ai.request.choice.count"),
        ):
            value = self.request.get(param)
            if isinstance(value, int | float) and not isinstance(value, bool):
                attrs[attr] = value
        if self.context.capture_content:
            attrs["gen_ai.input.messages"] = _json_or_str(self.request.get("messages"))
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

    def finish_success(self, **fields: Any) -> UsageRecord | None:
        """Record a call that returned (``success_outcome``'s fields); never raises."""
        return self.complete(self.outcome(self.success_outcome, **fields))

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

    def success_outcome(
        self,
        *,
        usage: Any,
        response_model: str | None,
        response_id: str | None,
        finish_reasons: Sequence[str],
        output_text: str = "",
        partial: bool = False,
        extra_flags: Sequence[str] = (),
    ) -> Outcome:
        tokens, flags = sanitize_usage(usage)
        estimated = False
        if "usage_missing" in flags:
            # No usage from the provider (stream closed early, or an endpoint that omits it).
            tokens = TokenUsage(
                prompt_tokens=estimate_prompt_tokens(self.request.get("messages") or []),
                completion_tokens=estimate_tokens(output_text),
            )
            estimated = True
        flags.extend(extra_flags)
        quote = self.price_book.quote(self.model, tokens, estimated=estimated)
        cost_status = "unpriced" if "absurd_tokens" in flags else quote.status
        record = self._record(
            status="success",
            tokens=tokens,
            cost_pico=usd_to_pico(quote.cost_usd) if cost_status != "unpriced" else 0,
            cost_status=cost_status,
            response_model=response_model,
            finish_reason=",".join(finish_reasons) or None,
            partial=partial,
            flags=flags,
        )
        attrs: dict[str, Any] = {}
        if self.span is None:
            return Outcome(record, attrs, None)  # no span to describe the response on
        attrs["gen_ai.response.finish_reasons"] = list(finish_reasons)
        if response_model:
            attrs["gen_ai.response.model"] = response_model
        if response_id:
            attrs["gen_ai.response.id"] = response_id
        if self.context.capture_content and output_text:
            attrs["gen_ai.output.messages"] = output_text
        return Outcome(record, attrs, None)

    def error_outcome(
        self, exc: BaseException, *, partial_usage: Any = None, output_text: str = ""
    ) -> Outcome:
        tokens, flags = sanitize_usage(partial_usage)
        cost_pico, cost_status = 0, "priced"
        if partial_usage is not None:
            quote = self.price_book.quote(self.model, tokens)
            cost_pico, cost_status = usd_to_pico(quote.cost_usd), quote.status
        elif output_text:
            # A stream that broke after content arrived: the tokens were produced and billed.
            tokens = TokenUsage(
                prompt_tokens=estimate_prompt_tokens(self.request.get("messages") or []),
                completion_tokens=estimate_tokens(output_text),
            )
            quote = self.price_book.quote(self.model, tokens, estimated=True)
            cost_pico, cost_status = usd_to_pico(quote.cost_usd), quote.status
        else:
            flags = []
        record = self._record(
            status="error",
            tokens=tokens,
            cost_pico=cost_pico,
            cost_status=cost_status,
            partial=bool(output_text) or partial_usage is not None,
            flags=flags,
            error_type=type(exc).__name__,
            error_message=safe_error_message(exc, self._error_secrets()),
        )
        return Outcome(record, {}, exc)

    def blocked_outcome(self, exc: BaseException) -> Outcome:
        record = self._record(
            status="blocked",
            tokens=TokenUsage(),
            cost_pico=0,
            cost_status="priced",
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
            settled = self.writer.write(record, also=joined).also_committed
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
            settled = (await asyncio.wrap_future(worker.write(record, joined))).also_committed
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

    def _settle_alone(self, record: UsageRecord) -> None:
        assert self.settle is not None
        try:
            self.settle(None, record)
        except Exception:
            TRACKING_ERRORS.labels("settle").inc()
            logger.exception("Could not settle the budget reservation of %s", record.request_id)

    def _observe_outcome(self, outcome: Outcome) -> None:
        try:
            self._observe(outcome.record)
        except Exception:
            TRACKING_ERRORS.labels("metrics").inc()
            logger.exception("Could not update LLM metrics")
        try:
            self._end_span(outcome.record, outcome.attrs, outcome.error)
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
        return (*self.context.secrets, *prompt_fragments(self.request.get("messages")))

    def _record(
        self,
        *,
        status: str,
        tokens: TokenUsage,
        cost_pico: int,
        cost_status: str,
        response_model: str | None = None,
        finish_reason: str | None = None,
        partial: bool = False,
        flags: Sequence[str] = (),
        error_type: str | None = None,
        error_message: str | None = None,
    ) -> UsageRecord:
        trace_id, span_id = self.trace_ids
        return UsageRecord(
            request_id=self.request_id,
            model=self.model,
            status=status,
            task_id=self.context.task_id,
            user_id=self.context.user_id,
            agent=self.context.agent,
            provider=self.context.provider,
            response_model=response_model,
            prompt_tokens=tokens.prompt_tokens,
            completion_tokens=tokens.completion_tokens,
            cached_tokens=tokens.cached_tokens,
            reasoning_tokens=tokens.reasoning_tokens,
            cost_pico_usd=cost_pico,
            cost_status=cost_status,
            latency_ms=(time.perf_counter() - self.started) * 1000.0,
            is_stream=self.is_stream,
            is_partial=partial,
            attempts=max(self.attempts[0], 1),
            finish_reason=finish_reason,
            error_type=error_type,
            error_message=error_message,
            flags=",".join(flags)[:200] or None,
            trace_id=trace_id,
            span_id=span_id,
        )

    def _observe(self, record: UsageRecord) -> None:
        model = model_label(record.model)
        agent = agent_label(record.agent)
        LLM_REQUESTS.labels(model, record.status, agent).inc()
        if record.status == "blocked":
            return
        exemplar = {"trace_id": record.trace_id} if record.trace_id else None
        LLM_LATENCY.labels(model).observe(record.latency_ms / 1000.0, exemplar=exemplar)
        for token_type, count in (
            ("prompt", record.prompt_tokens),
            ("completion", record.completion_tokens),
            ("cached", record.cached_tokens),
            ("reasoning", record.reasoning_tokens),
        ):
            if count:
                LLM_TOKENS.labels(model, token_type, agent).inc(count)
        if record.cost_pico_usd:
            LLM_COST.labels(model, agent).inc(float(record.cost_usd), exemplar=exemplar)
        if record.cost_status == "unpriced":
            LLM_UNPRICED.labels(model).inc()
        if record.attempts > 1:
            LLM_RETRIES.labels(model).inc(record.attempts - 1)

    def _end_span(
        self, record: UsageRecord, attrs: dict[str, Any], error: BaseException | None
    ) -> None:
        span = self.span
        if span is None:
            return
        cost = float(record.cost_usd)
        span.set_attributes(
            {
                **attrs,
                "gen_ai.usage.input_tokens": record.prompt_tokens,
                "gen_ai.usage.output_tokens": record.completion_tokens,
                "gen_ai.usage.cost": cost,
                "llm.prompt_tokens": record.prompt_tokens,
                "llm.completion_tokens": record.completion_tokens,
                "llm.total_tokens": record.total_tokens,
                "llm.cached_tokens": record.cached_tokens,
                "llm.reasoning_tokens": record.reasoning_tokens,
                "llm.cost_usd": cost,
                "llm.cost_status": record.cost_status,
                "llm.latency_ms": record.latency_ms,
                "llm.status": record.status,
                "llm.attempts": record.attempts,
            }
        )
        if record.is_partial:
            span.set_attribute("llm.partial", True)
        if error is not None:
            span.set_attribute("error.type", type(error).__name__)
            span.set_status(Status(StatusCode.ERROR, record.error_message or type(error).__name__))
        span.end()


def prompt_fragments(messages: Any) -> tuple[str, ...]:
    """The request's message texts, their longer lines and their JSON-escaped forms: what a
    provider may quote back in an error, masked there like a secret (the prompt is the
    caller's; it has no business in an error row, a span status or a log line)."""
    texts: list[str] = []
    for message in messages if isinstance(messages, list | tuple) else ():
        content = (
            message.get("content")
            if isinstance(message, Mapping)
            else getattr(message, "content", None)
        )
        parts: list[Any] = [content]
        if isinstance(content, list):
            parts = [p.get("text") for p in content if isinstance(p, Mapping)]
        for text in parts:
            if not isinstance(text, str) or not text.strip():
                continue
            lines = [line.strip() for line in text.splitlines()]
            for fragment in (text, *(line for line in lines if len(line) >= MIN_FRAGMENT_CHARS)):
                texts.extend((fragment, json.dumps(fragment)[1:-1]))
    return tuple(texts)


def _json_or_str(value: Any) -> str:
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return str(value)


def _is_noop(tracer: Tracer) -> bool:
    """True for a tracer that can only ever make invalid, non-recording spans."""
    if isinstance(tracer, trace.NoOpTracer):
        return True
    return isinstance(tracer, trace.ProxyTracer) and isinstance(
        trace.get_tracer_provider(), trace.ProxyTracerProvider
    )


def default_tracer() -> Tracer:
    return trace.get_tracer("app.tracking.llm_client")
