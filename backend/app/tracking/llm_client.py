"""``LLMClient``: the one door every LLM call goes through.

It wraps the official ``openai`` SDK, returns the SDK's own objects and raises the SDK's own
exceptions. Tracked: chat completions (``chat_completion``, ``chat.completions.create`` and
``chat.completions.parse`` with a pydantic ``response_format``), the Responses API
(``responses.create``, plain and streamed) and embeddings (``embeddings.create``); the
namespaces mirror the SDK's, so code written for ``openai.OpenAI`` runs on an ``LLMClient``.

Around each logical call it records exactly one ``llm_usage`` row (tokens, exact cost, latency,
status, provider, operation), one OpenTelemetry CLIENT span and the metrics. The budget is
reserved before the call is sent. SDK retries stay inside the logical call: the row counts the
HTTP attempts in ``attempts`` (and ``llm_retries_total``); providers bill only the attempt that
answered, so the cost is that attempt's usage.

The provider of a call (its ``gen_ai.provider.name`` and its prices) comes from ``provider=`` on
the call, on the client, or ``LLM_PROVIDER``, else from the endpoint URL, a ``provider/model``
prefix or the model name (``app.tracking.providers``).

Example (the seed's API)::

    client = LLMClient(task_id="task-123", user_id="user-456")
    response = client.chat_completion(messages=[...], model="gpt-4", temperature=0.7)
    limits = client.check_usage_limits(max_cost_per_task=10.0, max_cost_per_user=100.0)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol, TypeVar

import anyio
import openai
from openai import AsyncStream, Stream
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from opentelemetry import trace
from opentelemetry.metrics import Meter
from opentelemetry.trace import Tracer

from app.core.prepared import Tx
from app.core.runtime import Runtime, current_attempts, get_runtime
from app.tracking.db_worker import DbWorker
from app.tracking.genai_metrics import GenAIMetrics, genai_metrics
from app.tracking.namespaces import (
    AsyncChat,
    AsyncEmbeddings,
    AsyncResponses,
    Chat,
    Embeddings,
    Responses,
)
from app.tracking.operations import CHAT, EMBEDDINGS, Operation
from app.tracking.record import UsageRecord
from app.tracking.streams import (
    AsyncTrackedResponseStream,
    AsyncTrackedResponseStreamManager,
    AsyncTrackedStream,
    ResponsesStreamState,
    StreamState,
    TrackedResponseStream,
    TrackedResponseStreamManager,
    TrackedStream,
)
from app.tracking.tracker import CallContext, CallTracker, complete_shielded, default_tracer
from app.usage import queries as usage_queries

__all__ = [
    "AsyncLLMClient",
    "AsyncTrackedStream",
    "BudgetGuard",
    "InvalidLLMRequest",
    "LLMClient",
    "TrackedStream",
]

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


def _as_list(value: Any, what: str) -> list[Any]:
    """Any iterable the SDK accepts, as a list we can read twice (a generator would not be)."""
    if isinstance(value, list):
        return value
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise InvalidLLMRequest(f"{what} must be a list, got {type(value).__name__}")
    return list(value)


def _validate_messages(messages: Any) -> list[Any]:
    checked = _as_list(messages, "messages")
    if not checked:
        raise InvalidLLMRequest("messages must contain at least one message")
    for index, message in enumerate(checked):
        if not isinstance(message, Mapping) and not hasattr(message, "role"):
            raise InvalidLLMRequest(
                f"messages[{index}] must be an object with a role, got {type(message).__name__}"
            )
    return checked


def _validate_input(operation: Operation, kwargs: dict[str, Any]) -> None:
    if operation is CHAT:
        kwargs["messages"] = _validate_messages(kwargs.get("messages"))
    elif operation is EMBEDDINGS:
        value = kwargs.get("input")
        if not isinstance(value, str):
            kwargs["input"] = _as_list(value, "input")
    elif "input" in kwargs and not isinstance(kwargs["input"], str):
        kwargs["input"] = _as_list(kwargs["input"], "input")


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
        provider: str | None = None,
        meter: Meter | None = None,
    ) -> None:
        self.task_id = task_id
        self.user_id = user_id
        self.agent = agent
        self.provider = provider
        self._runtime = runtime
        self._tracer = tracer
        self._fallback_tracer: Tracer | None = None
        self._budget = budget
        self._meter = meter
        self._genai_metrics: GenAIMetrics | None = None
        self._metrics_resolved = False
        self._endpoint: tuple[int, str | None] | None = None

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

    @property
    def client(self) -> Any:
        raise NotImplementedError

    def _default_tracer(self) -> Tracer:
        # Resolved once per client: a tracer obtained before a provider is set delegates to it.
        if self._fallback_tracer is None:
            self._fallback_tracer = default_tracer()
        return self._fallback_tracer

    def _metrics(self) -> GenAIMetrics | None:
        # Resolved once per client (clients are made after the service installs its meter
        # provider); a lookup of the global provider costs ~10 us, too much for every call.
        if not self._metrics_resolved:
            self._genai_metrics = genai_metrics(self._meter)
            self._metrics_resolved = True
        return self._genai_metrics

    def _endpoint_url(self) -> str | None:
        """The SDK client's base URL (read once per SDK client)."""
        client = self.client
        if self._endpoint is None or self._endpoint[0] != id(client):
            base = getattr(client, "base_url", None)
            self._endpoint = (id(client), str(base) if base is not None else None)
        return self._endpoint[1]

    def _prepare(
        self, operation: Operation, kwargs: dict[str, Any], *, streamed: bool = False
    ) -> _Prepared:
        """The call's tracker; ``streamed``: a streaming helper (``responses.stream()``) whose
        arguments carry no ``stream=True``."""
        rt = self.runtime
        settings = rt.settings
        provider = kwargs.pop("provider", None) or self.provider or settings.llm_provider
        _validate_input(operation, kwargs)
        model = kwargs.get("model")
        if model is None and operation is not EMBEDDINGS:
            model = settings.default_model
        if not isinstance(model, str) or not model.strip():
            raise InvalidLLMRequest("model must be a non-empty string")
        kwargs["model"] = model
        is_stream = streamed or bool(kwargs.get("stream"))
        if is_stream and operation is CHAT:
            # Usage arrives in a last chunk only when asked for; a caller's explicit
            # include_usage=False is respected (the row's cost is then estimated).
            options = kwargs.get("stream_options")
            if not isinstance(options, Mapping):
                kwargs["stream_options"] = {"include_usage": True}
            elif "include_usage" not in options:
                kwargs["stream_options"] = {**options, "include_usage": True}
        endpoint = self._endpoint_url()
        resolved = rt.price_book.resolve(model, provider, endpoint)
        tracker = CallTracker(
            writer=rt.writer,
            price_book=rt.price_book,
            tracer=self._tracer or self._default_tracer(),
            context=CallContext(
                task_id=self.task_id,
                user_id=self.user_id,
                agent=self.agent,
                provider=resolved.provider,
                capture_content=settings.otel_instrumentation_genai_capture_message_content,
                secrets=rt.secrets,
                deprecated_attributes=settings.otel_genai_deprecated_attributes,
            ),
            model=model,
            request={**kwargs, "stream": True} if streamed else kwargs,
            is_stream=is_stream,
            operation=operation,
            provider_setting=provider,
            endpoint_url=endpoint,
            metrics=self._metrics(),
        )
        return _Prepared(tracker=tracker, kwargs=kwargs)

    def _reserve(self, prepared: _Prepared) -> None:
        """Reserve budget before the call; a refusal is recorded as a blocked call."""
        guard = self.budget
        if guard is None:
            return
        tracker = prepared.tracker
        try:
            prepared.reservation = guard.reserve(
                context=tracker.context,
                model=tracker.model,
                request=tracker.operation.budget_request(prepared.kwargs),
            )
        except Exception as exc:
            tracker.finish_blocked(exc)
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

    def _give_back(self, prepared: _Prepared) -> None:
        """On the tracking thread: the reservation of a call whose caller was cancelled before
        the call was made, given back (it would otherwise be held until it expires)."""
        give_back_held = getattr(self.budget, "give_back_held", None)
        if give_back_held is not None:
            give_back_held(prepared.reservation)

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


# -- synchronous ------------------------------------------------------------------------------


class LLMClient(_BaseLLMClient):
    """Tracked synchronous calls: ``chat_completion`` (the seed's), and ``chat.completions``,
    ``responses`` and ``embeddings`` shaped as the SDK's."""

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
        provider: str | None = None,
        meter: Meter | None = None,
    ) -> None:
        super().__init__(
            task_id,
            user_id,
            agent,
            runtime=runtime,
            tracer=tracer,
            budget=budget,
            provider=provider,
            meter=meter,
        )
        self._client = openai_client
        self.chat = Chat(self)
        self.responses = Responses(self)
        self.embeddings = Embeddings(self)

    @property
    def client(self) -> openai.OpenAI:
        return self._client or self.runtime.openai_client

    def chat_completion(
        self, messages: Iterable[Any], model: str | None = None, **kwargs: Any
    ) -> ChatCompletion | TrackedStream[ChatCompletionChunk]:
        """``client.chat.completions.create(...)``, tracked. Returns the SDK's object (a
        ``TrackedStream`` yielding the SDK's chunks when ``stream=True``)."""
        return self.chat.completions.create(messages=messages, model=model, **kwargs)

    def _call(
        self,
        operation: Operation,
        kwargs: dict[str, Any],
        invoke: Callable[..., Any],
        new_state: Callable[[], StreamState] | None = None,
    ) -> Any:
        prepared = self._prepare(operation, kwargs)
        tracker = prepared.tracker
        self._start_call(prepared)
        token = current_attempts.set(tracker.attempts)
        try:
            with _as_current(tracker):
                result = invoke(**prepared.kwargs)
        except BaseException as exc:
            tracker.finish_error(exc)
            raise
        finally:
            current_attempts.reset(token)
        if isinstance(result, Stream) and new_state is not None:
            return TrackedStream(result, tracker, new_state())
        tracker.finish_success(operation.fields(result))
        return result

    def _start_call(self, prepared: _Prepared) -> None:
        """Start the call's span and reserve its budget (a refusal is recorded and raised)."""
        prepared.tracker.start()
        self._reserve(prepared)
        self._arm_settlement(prepared)

    def _call_stream_manager(
        self, operation: Operation, kwargs: dict[str, Any], invoke: Callable[..., Any]
    ) -> TrackedResponseStreamManager:
        """A streaming helper's context manager (``responses.stream()``), tracked: the request
        is checked now; the budget is reserved and the request made on entry."""
        prepared = self._prepare(operation, kwargs, streamed=True)

        def open_stream() -> tuple[Any, TrackedResponseStream[Any]]:
            tracker = prepared.tracker
            self._start_call(prepared)
            token = current_attempts.set(tracker.attempts)
            try:
                with _as_current(tracker):
                    manager = invoke(**prepared.kwargs)
                    stream = manager.__enter__()
            except BaseException as exc:
                tracker.finish_error(exc)
                raise
            finally:
                current_attempts.reset(token)
            return manager, TrackedResponseStream(stream, tracker, ResponsesStreamState())

        return TrackedResponseStreamManager(open_stream)


# -- asynchronous -----------------------------------------------------------------------------


class AsyncLLMClient(_BaseLLMClient):
    """Tracked asynchronous calls; the same accounting and namespaces as ``LLMClient``."""

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
        provider: str | None = None,
        meter: Meter | None = None,
    ) -> None:
        super().__init__(
            task_id,
            user_id,
            agent,
            runtime=runtime,
            tracer=tracer,
            budget=budget,
            provider=provider,
            meter=meter,
        )
        self._client = openai_client
        self.chat = AsyncChat(self)
        self.responses = AsyncResponses(self)
        self.embeddings = AsyncEmbeddings(self)

    @property
    def client(self) -> openai.AsyncOpenAI:
        return self._client or self.runtime.async_openai_client

    async def chat_completion(
        self, messages: Iterable[Any], model: str | None = None, **kwargs: Any
    ) -> ChatCompletion | AsyncTrackedStream[ChatCompletionChunk]:
        return await self.chat.completions.create(messages=messages, model=model, **kwargs)

    async def _call(
        self,
        operation: Operation,
        kwargs: dict[str, Any],
        invoke: Callable[..., Awaitable[Any]],
        new_state: Callable[[], StreamState] | None = None,
    ) -> Any:
        prepared = self._prepare(operation, kwargs)
        tracker = prepared.tracker
        worker = await self._start_call(prepared)
        token = current_attempts.set(tracker.attempts)
        try:
            with _as_current(tracker):
                result = await invoke(**prepared.kwargs)
        except BaseException as exc:
            await complete_shielded(tracker, tracker.outcome(tracker.error_outcome, exc), worker)
            raise
        finally:
            current_attempts.reset(token)
        if isinstance(result, AsyncStream) and new_state is not None:
            return AsyncTrackedStream(result, tracker, worker, new_state())
        outcome = tracker.outcome(tracker.success_outcome, operation.fields(result))
        await complete_shielded(tracker, outcome, worker)
        return result

    async def _start_call(self, prepared: _Prepared) -> DbWorker:
        """Start the call's span and reserve its budget (off the event loop when it must
        wait); the tracking thread that will record it."""
        worker = self.runtime.db_worker
        prepared.tracker.start()
        if (
            self.budget is not None
            and not self._reserve_nowait(prepared)
            and not await self._reserve_in_writer(prepared, worker)
        ):
            await _on_worker(
                worker,
                lambda: self._reserve(prepared),
                abandoned=lambda _: self._give_back(prepared),
            )
        self._arm_settlement(prepared)
        return worker

    async def _reserve_in_writer(self, prepared: _Prepared, worker: DbWorker) -> bool:
        """Have the writer process take the call's reservation (``reserve_in_writer``: its
        transaction then runs outside this process's GIL); True if it did, or found none
        needed. False: the tracking thread reserves (``_reserve``), which decides anything else
        (a refusal, an outage) and records it."""
        guard = self.runtime.budget_guard
        # The writer process reserves with the runtime's own settings: only for its guard.
        if self.budget is not guard:
            return False
        if guard is None:  # (apart: mypy keeps the narrowing then)
            return False
        tracker = prepared.tracker
        prepared.reservation = await guard.reserve_in_writer(
            worker,
            context=tracker.context,
            model=tracker.model,
            request=tracker.operation.budget_request(prepared.kwargs),
        )
        return prepared.reservation is not None

    def _call_stream_manager(
        self, operation: Operation, kwargs: dict[str, Any], invoke: Callable[..., Any]
    ) -> AsyncTrackedResponseStreamManager:
        """The async twin of ``LLMClient._call_stream_manager``."""
        prepared = self._prepare(operation, kwargs, streamed=True)

        async def open_stream() -> tuple[Any, AsyncTrackedResponseStream[Any]]:
            tracker = prepared.tracker
            worker = await self._start_call(prepared)
            token = current_attempts.set(tracker.attempts)
            try:
                with _as_current(tracker):
                    manager = invoke(**prepared.kwargs)
                    stream = await manager.__aenter__()
            except BaseException as exc:
                outcome = tracker.outcome(tracker.error_outcome, exc)
                await complete_shielded(tracker, outcome, worker)
                raise
            finally:
                current_attempts.reset(token)
            tracked = AsyncTrackedResponseStream(stream, tracker, worker, ResponsesStreamState())
            return manager, tracked

        return AsyncTrackedResponseStreamManager(open_stream)


async def _on_worker(
    worker: DbWorker, func: Callable[[], T], *, abandoned: Callable[[T], object] | None = None
) -> T:
    """Run blocking tracking work on the tracking thread, even if the caller is cancelled
    (anyio's cancellation waits for it; a native one, ``task.cancel()``, hands its result to
    ``abandoned`` on that thread)."""
    with anyio.CancelScope(shield=True):
        result = await worker.call_async(func, abandoned=abandoned)
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
