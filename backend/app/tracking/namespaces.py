"""The SDK-shaped namespaces of ``LLMClient`` and ``AsyncLLMClient``.

``client.chat.completions.create``/``parse``, ``client.responses.create``/``parse``/``stream``
and ``client.embeddings.create`` take the official SDK's arguments and return its objects (a tracked
stream for ``stream=True``), so code written for ``openai.OpenAI`` runs on an ``LLMClient``. Each
method hands the SDK call to the owning client's ``_call``, which tracks it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ParsedChatCompletion
from openai.types.responses import ParsedResponse, Response, ResponseStreamEvent

from app.tracking.operations import CHAT, EMBEDDINGS, RESPONSES
from app.tracking.streams import (
    AsyncTrackedResponseStreamManager,
    AsyncTrackedStream,
    ChatStreamState,
    ResponsesStreamState,
    TrackedResponseStreamManager,
    TrackedStream,
)

if TYPE_CHECKING:
    from app.tracking.llm_client import AsyncLLMClient, LLMClient


class ChatCompletions:
    def __init__(self, owner: LLMClient) -> None:
        self._owner = owner

    def create(self, **kwargs: Any) -> ChatCompletion | TrackedStream[ChatCompletionChunk]:
        """``chat.completions.create``, tracked (``messages`` may be any iterable)."""
        owner = self._owner
        return owner._call(  # type: ignore[no-any-return]
            CHAT, kwargs, owner.client.chat.completions.create, ChatStreamState
        )

    def parse(self, **kwargs: Any) -> ParsedChatCompletion[Any]:
        """``chat.completions.parse`` (structured outputs: ``response_format`` a pydantic
        class), tracked. Returns the SDK's ``ParsedChatCompletion``."""
        owner = self._owner
        return owner._call(CHAT, kwargs, owner.client.chat.completions.parse)  # type: ignore[no-any-return]


class Chat:
    def __init__(self, owner: LLMClient) -> None:
        self.completions = ChatCompletions(owner)


class Responses:
    def __init__(self, owner: LLMClient) -> None:
        self._owner = owner

    def create(self, **kwargs: Any) -> Response | TrackedStream[ResponseStreamEvent]:
        """``responses.create``, tracked; with ``stream=True`` a ``TrackedStream`` of the SDK's
        events (usage comes with ``response.completed``)."""
        owner = self._owner
        return owner._call(  # type: ignore[no-any-return]
            RESPONSES, kwargs, owner.client.responses.create, ResponsesStreamState
        )

    def parse(self, **kwargs: Any) -> ParsedResponse[Any]:
        """``responses.parse`` (structured outputs: ``text_format`` a pydantic class), tracked.
        Returns the SDK's ``ParsedResponse``."""
        owner = self._owner
        return owner._call(RESPONSES, kwargs, owner.client.responses.parse)  # type: ignore[no-any-return]

    def stream(self, **kwargs: Any) -> TrackedResponseStreamManager:
        """``responses.stream``, tracked: ``with client.responses.stream(...) as stream`` yields
        the SDK's events (and ``get_final_response()``); one row per call, partial when the
        block is left before the response completed."""
        owner = self._owner
        return owner._call_stream_manager(RESPONSES, kwargs, owner.client.responses.stream)


class Embeddings:
    def __init__(self, owner: LLMClient) -> None:
        self._owner = owner

    def create(self, **kwargs: Any) -> CreateEmbeddingResponse:
        """``embeddings.create``, tracked (``model`` is required: there is no default)."""
        owner = self._owner
        return owner._call(EMBEDDINGS, kwargs, owner.client.embeddings.create)  # type: ignore[no-any-return]


class AsyncChatCompletions:
    def __init__(self, owner: AsyncLLMClient) -> None:
        self._owner = owner

    async def create(
        self, **kwargs: Any
    ) -> ChatCompletion | AsyncTrackedStream[ChatCompletionChunk]:
        owner = self._owner
        return await owner._call(  # type: ignore[no-any-return]
            CHAT, kwargs, owner.client.chat.completions.create, ChatStreamState
        )

    async def parse(self, **kwargs: Any) -> ParsedChatCompletion[Any]:
        owner = self._owner
        return await owner._call(CHAT, kwargs, owner.client.chat.completions.parse)  # type: ignore[no-any-return]


class AsyncChat:
    def __init__(self, owner: AsyncLLMClient) -> None:
        self.completions = AsyncChatCompletions(owner)


class AsyncResponses:
    def __init__(self, owner: AsyncLLMClient) -> None:
        self._owner = owner

    async def create(self, **kwargs: Any) -> Response | AsyncTrackedStream[ResponseStreamEvent]:
        owner = self._owner
        return await owner._call(  # type: ignore[no-any-return]
            RESPONSES, kwargs, owner.client.responses.create, ResponsesStreamState
        )

    async def parse(self, **kwargs: Any) -> ParsedResponse[Any]:
        owner = self._owner
        return await owner._call(RESPONSES, kwargs, owner.client.responses.parse)  # type: ignore[no-any-return]

    def stream(self, **kwargs: Any) -> AsyncTrackedResponseStreamManager:
        """``async with client.responses.stream(...) as stream``, tracked."""
        owner = self._owner
        return owner._call_stream_manager(RESPONSES, kwargs, owner.client.responses.stream)


class AsyncEmbeddings:
    def __init__(self, owner: AsyncLLMClient) -> None:
        self._owner = owner

    async def create(self, **kwargs: Any) -> CreateEmbeddingResponse:
        owner = self._owner
        return await owner._call(EMBEDDINGS, kwargs, owner.client.embeddings.create)  # type: ignore[no-any-return]
