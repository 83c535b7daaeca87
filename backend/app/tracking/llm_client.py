"""``LLMClient``: the one door every LLM call goes through.

It wraps the official ``openai`` SDK's chat completions and returns the SDK's own objects and
raises the SDK's own exceptions. Around each logical call it records exactly one ``llm_usage``
row (tokens, exact cost, latency, status), one OpenTelemetry CLIENT span named ``chat {model}``
and the Prometheus metrics. SDK retries stay inside the logical call: the row counts the HTTP
attempts in ``attempts`` (and ``llm_retries_total``); providers bill only the attempt that
answered, so the cost is that attempt's usage.

Example (the seed's API)::

    client = LLMClient(task_id="task-123", user_id="user-456")
    response = client.chat_completion(messages=[...], model="gpt-4", temperature=0.7)
    limits = client.check_usage_limits(max_cost_per_task=10.0, max_cost_per_user=100.0)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol, TypeVar

import anyio
import openai
from openai import AsyncStream, Stream
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from opentelemetry import trace
from opentelemetry.trace import Tracer

from app.core.prepared import Tx
from app.core.runtime import Runtime, current_attempts, get_runtime
from app.tracking.db_worker import DbWorker
from app.tracking.record import UsageRecord
from app.tracking.tracker import CallContext, CallTracker, Outcome, default_tracer
from app.usage import queries as usage_queries

T = TypeVar("T")


class InvalidLLMRequest(ValueError):
    """The call's arguments are malformed; raised before anything is sent or recorded."""


class BudgetGuard(Protocol):
    """Reserves a call's worst-case cost before it is made and settles it after."""

    def reserve(self, *, context: CallContext, model: str, request: Mapping[str, Any]) -> Any:
        """Return a reservation handle, or raise ``BudgetExceededError``."""

    def settle(self, reservation: Any, record: UsageRecord, tx: Tx | None = None) -> None:
        """Replace the reservation with the call's real cost (0 when it failed), inside
        ``tx`` when given (the usage row's transaction), else in a transaction of its own."""


def _validate_messages(messages: Any) -> list[Any]:
    if not isinstance(messages, list | tuple):
        raise InvalidLLMRequest(
            f"messages must be a list of message objects, got {type(messages).__name__}"
        )
    if not messages:
        raise InvalidLLMRequest("messages must contain at least one message")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) and not hasattr(message, "role"):
            raise InvalidLLMRequest(
                f"messages[{index}] must be an object with a role, got {type(message).__name__}"
            )
    return list(messages)


def _response_fields(response: ChatCompletion) -> dict[str, Any]:
    reasons = [c.finish_reason for c in response.choices if c.finish_reason]
    text = "".join(c.message.content or "" for c in response.choices if c.message)
    return {
        "usage": response.usage,
        "response_model": response.model,
        "response_id": response.id,
        "finish_reasons": reasons,
        "output_text": text,
    }


class _StreamState:
    """What a stream has shown so far: usage, model, finish reasons, text."""

    def __init__(self) -> None:
        self.usage: Any = None
        self.model: str | None = None
        self.response_id: str | None = None
        self.reasons: dict[int, str] = {}
        self.text: list[str] = []

    def see(self, chunk: ChatCompletionChunk) -> None:
        if chunk.usage is not None:
            self.usage = chunk.usage
        self.model = chunk.model or self.model
        self.response_id = chunk.id or self.response_id
        for choice in chunk.choices:
            if choice.delta is not None and choice.delta.content:
                self.text.append(choice.delta.content)
            if choice.finish_reason:
                self.reasons[choice.index] = choice.finish_reason

    def outcome(self, tracker: CallTracker, *, partial: bool) -> Outcome | None:
        return tracker.outcome(
            tracker.success_outcome,
            usage=self.usage,
            response_model=self.model,
            response_id=self.response_id,
            finish_reasons=list(self.reasons.values()),
            output_text="".join(self.text),
            partial=partial,
            extra_flags=("stream_closed_early",) if partial else (),
        )

    def error_outcome(self, tracker: CallTracker, exc: BaseException) -> Outcome | None:
        return tracker.outcome(
            tracker.error_outcome, exc, partial_usage=self.usage, output_text="".join(self.text)
        )


class TrackedStream:
    """The SDK's ``Stream`` with accounting: chunks pass through unchanged.

    Usage is recorded when the stream ends, fails, or is closed early (then flagged partial,
    with the tokens known so far, estimated when the provider never sent its usage chunk).
    """

    def __init__(self, stream: Stream[ChatCompletionChunk], tracker: CallTracker) -> None:
        self._stream = stream
        self._tracker = tracker
        self._state = _StreamState()
        self._done = False

    def __iter__(self) -> Iterator[ChatCompletionChunk]:
        try:
            for chunk in self._stream:
                self._state.see(chunk)
                yield chunk
        except GeneratorExit:
            self._finish(partial=True)
            raise
        except BaseException as exc:
            self._fail(exc)
            raise
        self._finish(partial=False)

    def __next__(self) -> ChatCompletionChunk:
        if not hasattr(self, "_iterator"):
            self._iterator = iter(self)
        return next(self._iterator)

    def __enter__(self) -> TrackedStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP response; an unfinished stream is recorded as partial."""
        try:
            self._stream.close()
        finally:
            self._finish(partial=True)

    def __del__(self) -> None:
        if not getattr(self, "_done", True):
            self._finish(partial=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def _finish(self, *, partial: bool) -> None:
        if not self._done:
            self._done = True
            self._tracker.complete(self._state.outcome(self._tracker, partial=partial))

    def _fail(self, exc: BaseException) -> None:
        if not self._done:
            self._done = True
            self._tracker.complete(self._state.error_outcome(self._tracker, exc))


class AsyncTrackedStream:
    """The async twin of ``TrackedStream``."""

    def __init__(
        self, stream: AsyncStream[ChatCompletionChunk], tracker: CallTracker, worker: DbWorker
    ) -> None:
        self._stream = stream
        self._tracker = tracker
        self._worker = worker
        self._state = _StreamState()
        self._done = False

    async def __aiter__(self) -> AsyncIterator[ChatCompletionChunk]:
        try:
            async for chunk in self._stream:
                self._state.see(chunk)
                yield chunk
        except (GeneratorExit, anyio.get_cancelled_exc_class()):
            await self._finish(partial=True)
            raise
        except BaseException as exc:
            await self._fail(exc)
            raise
        await self._finish(partial=False)

    async def __aenter__(self) -> AsyncTrackedStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        try:
            await self._stream.close()
        finally:
            await self._finish(partial=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def _finish(self, *, partial: bool) -> None:
        if not self._done:
            self._done = True
            outcome = self._state.outcome(self._tracker, partial=partial)
            await _complete(self._tracker, outcome, self._worker)

    async def _fail(self, exc: BaseException) -> None:
        if not self._done:
            self._done = True
            outcome = self._state.error_outcome(self._tracker, exc)
            await _complete(self._tracker, outcome, self._worker)


async def _complete(tracker: CallTracker, outcome: Outcome | None, worker: DbWorker) -> None:
    """Record the outcome off the event loop, even if the caller is being cancelled."""
    with anyio.CancelScope(shield=True):
        await tracker.complete_async(outcome, worker)


async def _on_worker(worker: DbWorker, func: Callable[[], T]) -> T:
    """Run blocking tracking work on the tracking thread, even if the caller is cancelled."""
    with anyio.CancelScope(shield=True):
        result = await asyncio.wrap_future(worker.call(func))
    return result


@dataclass
class _Prepared:
    tracker: CallTracker
    kwargs: dict[str, Any]
    reservation: Any = None


class _BaseLLMClient:
    def __init__(
        self,
        task_id: str | None = None,
        user_id: str | None = None,
        agent: str | None = None,
        *,
        runtime: Runtime | None = None,
        tracer: Tracer | None = None,
        budget: BudgetGuard | None = None,
    ) -> None:
        self.task_id = task_id
        self.user_id = user_id
        self.agent = agent
        self._runtime = runtime
        self._tracer = tracer
        self._fallback_tracer: Tracer | None = None
        self._budget = budget

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            self._runtime = get_runtime()
        return self._runtime

    @property
    def budget(self) -> BudgetGuard | None:
        if self._budget is None:
            self._budget = self.runtime.budget_guard
        return self._budget

    def _default_tracer(self) -> Tracer:
        # Resolved once per client: a tracer obtained before a provider is set delegates to it.
        if self._fallback_tracer is None:
            self._fallback_tracer = default_tracer()
        return self._fallback_tracer

    def _context(self) -> CallContext:
        rt = self.runtime
        return CallContext(
            task_id=self.task_id,
            user_id=self.user_id,
            agent=self.agent,
            capture_content=rt.settings.otel_instrumentation_genai_capture_message_content,
            secrets=rt.secrets,
        )

    def _prepare(self, messages: Any, model: str | None, kwargs: dict[str, Any]) -> _Prepared:
        checked = _validate_messages(messages)
        rt = self.runtime
        model = model or rt.settings.default_model
        if not isinstance(model, str) or not model.strip():
            raise InvalidLLMRequest("model must be a non-empty string")
        is_stream = bool(kwargs.get("stream"))
        if is_stream and "stream_options" not in kwargs:
            kwargs["stream_options"] = {"include_usage": True}
        kwargs["messages"] = checked
        kwargs["model"] = model
        tracker = CallTracker(
            writer=rt.writer,
            price_book=rt.price_book,
            tracer=self._tracer or self._default_tracer(),
            context=self._context(),
            model=model,
            request=kwargs,
            is_stream=is_stream,
        )
        return _Prepared(tracker=tracker, kwargs=kwargs)

    def _reserve(self, prepared: _Prepared) -> None:
        """Reserve budget before the call; a refusal is recorded as a blocked call."""
        guard = self.budget
        if guard is None:
            return
        try:
            prepared.reservation = guard.reserve(
                context=prepared.tracker.context,
                model=prepared.tracker.model,
                request=prepared.kwargs,
            )
        except Exception as exc:
            prepared.tracker.finish_blocked(exc)
            raise

    def _reserve_nowait(self, prepared: _Prepared) -> bool:
        """Reserve without blocking when the guard can (nothing limits the call); True if so."""
        nowait = getattr(self.budget, "reserve_nowait", None)
        if nowait is None:
            return False
        try:
            prepared.reservation = nowait(context=prepared.tracker.context)
        except Exception:
            return False  # the blocking path decides, and records a refusal
        return prepared.reservation is not None

    def _arm_settlement(self, prepared: _Prepared) -> None:
        """Have the tracker settle the reservation with the call's final record."""
        guard, reservation = self.budget, prepared.reservation
        if guard is not None and reservation is not None and getattr(reservation, "held", True):
            prepared.tracker.settle = lambda conn, record: guard.settle(reservation, record, conn)

    # -- the seed's usage helpers ---------------------------------------------------------

    def get_task_usage(self) -> dict[str, Any]:
        """Totals of every call made for this client's task."""
        if self.task_id is None:
            raise InvalidLLMRequest("this client has no task_id")
        with self.runtime.engine.connect() as conn:
            totals = usage_queries.task_spend(conn, self.task_id)
        return {"task_id": self.task_id, **_totals_dict(totals)}

    def get_user_usage(self, days: int = 30) -> dict[str, Any]:
        """Totals of this client's user over the last ``days`` days."""
        if self.user_id is None:
            raise InvalidLLMRequest("this client has no user_id")
        with self.runtime.engine.connect() as conn:
            totals = usage_queries.user_spend(conn, self.user_id, days)
        return {"user_id": self.user_id, "days": days, **_totals_dict(totals)}

    def check_usage_limits(
        self,
        max_cost_per_task: float | Decimal | None = None,
        max_cost_per_user: float | Decimal | None = None,
    ) -> dict[str, Any]:
        """Compare spend with the given caps: ``within_limits`` and the figures behind it."""
        result: dict[str, Any] = {"within_limits": True, "violations": []}
        if max_cost_per_task is not None and self.task_id is not None:
            spent = Decimal(str(self.get_task_usage()["total_cost_usd"]))
            cap = Decimal(str(max_cost_per_task))
            result.update(task_cost_usd=float(spent), max_cost_per_task=float(cap))
            if spent > cap:
                result["within_limits"] = False
                result["violations"].append(f"Task cost ${spent} exceeds limit ${cap}")
        if max_cost_per_user is not None and self.user_id is not None:
            spent = Decimal(str(self.get_user_usage()["total_cost_usd"]))
            cap = Decimal(str(max_cost_per_user))
            result.update(user_cost_usd=float(spent), max_cost_per_user=float(cap))
            if spent > cap:
                result["within_limits"] = False
                result["violations"].append(f"User cost ${spent} exceeds limit ${cap}")
        return result


def _totals_dict(totals: usage_queries.SpendTotals) -> dict[str, Any]:
    return {
        "total_requests": totals.requests,
        "total_prompt_tokens": totals.prompt_tokens,
        "total_completion_tokens": totals.completion_tokens,
        "total_tokens": totals.total_tokens,
        "total_cost_usd": float(totals.cost_usd),
        "total_cost_usd_exact": str(totals.cost_usd),
    }


class LLMClient(_BaseLLMClient):
    """Tracked synchronous chat completions."""

    def __init__(
        self,
        task_id: str | None = None,
        user_id: str | None = None,
        agent: str | None = None,
        *,
        runtime: Runtime | None = None,
        openai_client: openai.OpenAI | None = None,
        tracer: Tracer | None = None,
        budget: BudgetGuard | None = None,
    ) -> None:
        super().__init__(task_id, user_id, agent, runtime=runtime, tracer=tracer, budget=budget)
        self._client = openai_client

    @property
    def client(self) -> openai.OpenAI:
        return self._client or self.runtime.openai_client

    def chat_completion(
        self, messages: Sequence[Any], model: str | None = None, **kwargs: Any
    ) -> ChatCompletion | TrackedStream:
        """``client.chat.completions.create(...)``, tracked. Returns the SDK's object (a
        ``TrackedStream`` yielding the SDK's chunks when ``stream=True``)."""
        prepared = self._prepare(messages, model, kwargs)
        tracker = prepared.tracker
        tracker.start()
        self._reserve(prepared)
        self._arm_settlement(prepared)
        token = current_attempts.set(tracker.attempts)
        try:
            with _as_current(tracker):
                result: ChatCompletion | Stream[ChatCompletionChunk]
                result = self.client.chat.completions.create(**prepared.kwargs)
        except BaseException as exc:
            tracker.finish_error(exc)
            raise
        finally:
            current_attempts.reset(token)
        if isinstance(result, Stream):
            return TrackedStream(result, tracker)
        tracker.finish_success(**_response_fields(result))
        return result


class AsyncLLMClient(_BaseLLMClient):
    """Tracked asynchronous chat completions; the same accounting as ``LLMClient``."""

    def __init__(
        self,
        task_id: str | None = None,
        user_id: str | None = None,
        agent: str | None = None,
        *,
        runtime: Runtime | None = None,
        openai_client: openai.AsyncOpenAI | None = None,
        tracer: Tracer | None = None,
        budget: BudgetGuard | None = None,
    ) -> None:
        super().__init__(task_id, user_id, agent, runtime=runtime, tracer=tracer, budget=budget)
        self._client = openai_client

    @property
    def client(self) -> openai.AsyncOpenAI:
        return self._client or self.runtime.async_openai_client

    async def chat_completion(
        self, messages: Sequence[Any], model: str | None = None, **kwargs: Any
    ) -> ChatCompletion | AsyncTrackedStream:
        prepared = self._prepare(messages, model, kwargs)
        tracker = prepared.tracker
        worker = self.runtime.db_worker
        tracker.start()
        if self.budget is not None and not self._reserve_nowait(prepared):
            await _on_worker(worker, lambda: self._reserve(prepared))
        self._arm_settlement(prepared)
        token = current_attempts.set(tracker.attempts)
        try:
            with _as_current(tracker):
                result: ChatCompletion | AsyncStream[ChatCompletionChunk]
                result = await self.client.chat.completions.create(**prepared.kwargs)
        except BaseException as exc:
            await _complete(tracker, tracker.outcome(tracker.error_outcome, exc), worker)
            raise
        finally:
            current_attempts.reset(token)
        if isinstance(result, AsyncStream):
            return AsyncTrackedStream(result, tracker, worker)
        outcome = tracker.outcome(tracker.success_outcome, **_response_fields(result))
        await _complete(tracker, outcome, worker)
        return result


def _as_current(tracker: CallTracker) -> Any:
    """The call's span as the current span while the SDK runs. The tracker records the outcome
    with a redacted message; the SDK's own exception event would carry the provider's raw error
    text, which may quote the API key or the prompt, so it is not recorded."""
    if tracker.span is None:
        return _null()
    return trace.use_span(
        tracker.span, end_on_exit=False, record_exception=False, set_status_on_exception=False
    )


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None
