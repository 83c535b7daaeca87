"""Streams with accounting: the SDK's ``Stream``/``AsyncStream`` passed through unchanged.

A tracked stream yields the SDK's own chunks (chat) or events (Responses API) and records the
call's row when the stream ends, fails, or is closed early (then flagged partial, with the tokens
known so far, estimated when the provider never sent its usage). A ``StreamState`` per API
follows what the stream has shown. ``responses.stream()``'s context manager is wrapped the same
way (``TrackedResponseStreamManager``): one row per call, partial when the block is left early.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import anyio
from openai import AsyncStream, Stream

from app.tracking.operations import RESPONSES, ResponseFields
from app.tracking.tracker import CallTracker, Outcome, complete_shielded

if TYPE_CHECKING:
    from app.tracking.db_worker import DbWorker

T = TypeVar("T")


class StreamState(Protocol):
    def see(self, item: Any) -> None: ...

    def fields(self) -> ResponseFields: ...


class ChatStreamState:
    """What a chat-completions stream has shown so far: usage, model, finish reasons, text."""

    def __init__(self) -> None:
        self.usage: Any = None
        self.model: str | None = None
        self.response_id: str | None = None
        self.fingerprint: str | None = None
        self.service_tier: str | None = None
        self.reasons: dict[int, str] = {}
        self.text: list[str] = []
        self.choice_texts: dict[int, list[str]] = {}

    def see(self, chunk: Any) -> None:
        if chunk.usage is not None:
            self.usage = chunk.usage
        self.model = chunk.model or self.model
        self.response_id = chunk.id or self.response_id
        self.fingerprint = getattr(chunk, "system_fingerprint", None) or self.fingerprint
        self.service_tier = getattr(chunk, "service_tier", None) or self.service_tier
        for choice in chunk.choices:
            if choice.delta is not None and choice.delta.content:
                self.text.append(choice.delta.content)
                self.choice_texts.setdefault(choice.index, []).append(choice.delta.content)
            if choice.finish_reason:
                self.reasons[choice.index] = choice.finish_reason

    def fields(self) -> ResponseFields:
        return ResponseFields(
            usage=self.usage,
            model=self.model,
            id=self.response_id,
            finish_reasons=list(self.reasons.values()),
            text="".join(self.text),
            system_fingerprint=self.fingerprint,
            service_tier=self.service_tier,
            choice_texts={i: "".join(parts) for i, parts in self.choice_texts.items()},
            choice_reasons=dict(self.reasons),
        )


class ResponsesStreamState:
    """What a Responses API event stream has shown: the response's id and model from
    ``response.created``, text deltas, and the final response (with its usage) from
    ``response.completed`` / ``response.incomplete`` / ``response.failed``."""

    def __init__(self) -> None:
        self.model: str | None = None
        self.response_id: str | None = None
        self.text: list[str] = []
        self.final: Any = None
        self.error_code: str | None = None

    def see(self, event: Any) -> None:
        kind = getattr(event, "type", None)
        if kind == "response.output_text.delta":
            self.text.append(event.delta)
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            self.final = event.response
        elif kind in ("response.created", "response.in_progress", "response.queued"):
            response = event.response
            self.model = getattr(response, "model", None) or self.model
            self.response_id = getattr(response, "id", None) or self.response_id
        elif kind == "error":
            self.error_code = getattr(event, "code", None) or "error"

    def fields(self) -> ResponseFields:
        if self.final is not None:
            fields = RESPONSES.fields(self.final)
            fields.text = fields.text or "".join(self.text)
        else:
            fields = ResponseFields(model=self.model, id=self.response_id, text="".join(self.text))
        if self.error_code is not None and fields.failure is None:
            fields.failure = self.error_code
        return fields


def _outcome(tracker: CallTracker, state: StreamState, *, partial: bool) -> Outcome | None:
    return tracker.outcome(
        tracker.success_outcome,
        state.fields(),
        partial=partial,
        extra_flags=("stream_closed_early",) if partial else (),
    )


def _error_outcome(tracker: CallTracker, state: StreamState, exc: BaseException) -> Outcome | None:
    fields = state.fields()
    return tracker.outcome(
        tracker.error_outcome, exc, partial_usage=fields.usage, output_text=fields.text
    )


class TrackedStream(Generic[T]):
    """The SDK's ``Stream`` with accounting: items pass through unchanged."""

    def __init__(self, stream: Stream[T], tracker: CallTracker, state: StreamState) -> None:
        self._stream = stream
        self._tracker = tracker
        self._state = state
        self._done = False

    def __iter__(self) -> Iterator[T]:
        first = True
        try:
            for item in self._stream:
                if first:
                    self._tracker.first_chunk_at = time.perf_counter()
                    first = False
                self._state.see(item)
                yield item
        except GeneratorExit:
            self._finish(partial=True)
            raise
        except BaseException as exc:
            self._fail(exc)
            raise
        self._finish(partial=False)

    def __next__(self) -> T:
        if not hasattr(self, "_iterator"):
            self._iterator = iter(self)
        return next(self._iterator)

    def __enter__(self) -> TrackedStream[T]:
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
            self._tracker.complete(_outcome(self._tracker, self._state, partial=partial))

    def _fail(self, exc: BaseException) -> None:
        if not self._done:
            self._done = True
            self._tracker.complete(_error_outcome(self._tracker, self._state, exc))


class AsyncTrackedStream(Generic[T]):
    """The async twin of ``TrackedStream``."""

    def __init__(
        self,
        stream: AsyncStream[T],
        tracker: CallTracker,
        worker: DbWorker,
        state: StreamState,
    ) -> None:
        self._stream = stream
        self._tracker = tracker
        self._worker = worker
        self._state = state
        self._done = False

    async def __aiter__(self) -> AsyncIterator[T]:
        first = True
        try:
            async for item in self._stream:
                if first:
                    self._tracker.first_chunk_at = time.perf_counter()
                    first = False
                self._state.see(item)
                yield item
        except (GeneratorExit, anyio.get_cancelled_exc_class()):
            await self._finish(partial=True)
            raise
        except BaseException as exc:
            await self._fail(exc)
            raise
        await self._finish(partial=False)

    async def __aenter__(self) -> AsyncTrackedStream[T]:
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
            outcome = _outcome(self._tracker, self._state, partial=partial)
            await complete_shielded(self._tracker, outcome, self._worker)

    async def _fail(self, exc: BaseException) -> None:
        if not self._done:
            self._done = True
            outcome = _error_outcome(self._tracker, self._state, exc)
            await complete_shielded(self._tracker, outcome, self._worker)


class TrackedResponseStream(TrackedStream[T]):
    """The SDK's ``ResponseStream`` (of ``responses.stream()``) with accounting: its helpers
    that read to the end go through the tracked iteration, so the events are seen."""

    def get_final_response(self) -> Any:
        self.until_done()
        return self._stream.get_final_response()  # type: ignore[attr-defined]

    def until_done(self) -> TrackedResponseStream[T]:
        for _ in self:
            pass
        return self


class TrackedResponseStreamManager:
    """``responses.stream()``'s context manager, tracked: the request is made (and the call's
    budget reserved) on entry, as the SDK does; leaving the block unfinished records the call
    as partial."""

    def __init__(self, open_stream: Callable[[], tuple[Any, TrackedResponseStream[Any]]]) -> None:
        self._open = open_stream
        self._manager: Any = None
        self._stream: TrackedResponseStream[Any] | None = None

    def __enter__(self) -> TrackedResponseStream[Any]:
        self._manager, self._stream = self._open()
        return self._stream

    def __exit__(self, *exc_info: Any) -> None:
        try:
            self._manager.__exit__(*exc_info)
        finally:
            if self._stream is not None:
                self._stream._finish(partial=True)  # nothing when it ended


class AsyncTrackedResponseStream(AsyncTrackedStream[T]):
    """The async twin of ``TrackedResponseStream``."""

    async def get_final_response(self) -> Any:
        await self.until_done()
        return await self._stream.get_final_response()  # type: ignore[attr-defined]

    async def until_done(self) -> AsyncTrackedResponseStream[T]:
        async for _ in self:
            pass
        return self


class AsyncTrackedResponseStreamManager:
    """The async twin of ``TrackedResponseStreamManager``."""

    def __init__(
        self,
        open_stream: Callable[[], Awaitable[tuple[Any, AsyncTrackedResponseStream[Any]]]],
    ) -> None:
        self._open = open_stream
        self._manager: Any = None
        self._stream: AsyncTrackedResponseStream[Any] | None = None

    async def __aenter__(self) -> AsyncTrackedResponseStream[Any]:
        self._manager, self._stream = await self._open()
        return self._stream

    async def __aexit__(self, *exc_info: Any) -> None:
        try:
            await self._manager.__aexit__(*exc_info)
        finally:
            if self._stream is not None:
                await self._stream._finish(partial=True)
