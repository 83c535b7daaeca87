"""HTTP answers of the simulator: OpenAI error bodies, server-sent events, deliberate breakage.

Server-sent events are written by hand rather than with sse-starlette: OpenAI's wire format is
just ``data: <json>\\n\\n`` lines ending in ``data: [DONE]\\n\\n``, without pings or event names,
and the faults need control over every byte, including leaving a body unfinished.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Send

logger = logging.getLogger(__name__)

DISCONNECT_POLL_SECONDS = 0.05


def request_id_headers() -> dict[str, str]:
    """``x-request-id`` as OpenAI sends it (the SDK exposes it as ``_request_id``)."""
    return {"x-request-id": f"req_{uuid.uuid4().hex}"}


def error_response(
    status: int,
    message: str,
    *,
    type_: str,
    code: str | None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """An OpenAI-style error: ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(
        body, status_code=status, headers={**request_id_headers(), **(headers or {})}
    )


def rate_limit_headers(retry_after_seconds: float) -> dict[str, str]:
    return {
        "retry-after": str(max(1, math.ceil(retry_after_seconds))),
        "retry-after-ms": str(round(retry_after_seconds * 1000)),
        "x-ratelimit-remaining-requests": "0",
    }


async def wait_for_client(request: Request, seconds: float, closing: threading.Event) -> bool:
    """Sleep ``seconds``, but stop as soon as the client hangs up or the server shuts down.

    True if the wait ran its course and the client is still there.
    """
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        if closing.is_set() or await request.is_disconnected():
            return False
        await asyncio.sleep(min(remaining, DISCONNECT_POLL_SECONDS))
    return not await request.is_disconnected()


def sse_event(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


class EventStream(StreamingResponse):
    """An OpenAI event stream, optionally abandoned mid-body so the server drops the connection.

    ``on_complete`` runs after the last byte of a complete stream reached the server's transport.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        events: list[bytes],
        *,
        chunk_delay_seconds: float,
        complete: bool = True,
        on_complete: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(
            self._paced(events, chunk_delay_seconds),
            headers={**request_id_headers(), "cache-control": "no-cache"},
            media_type="text/event-stream; charset=utf-8",
        )
        self._complete = complete
        self._on_complete = on_complete

    @staticmethod
    async def _paced(events: list[bytes], delay: float) -> AsyncIterator[bytes]:
        for index, event in enumerate(events):
            if index and delay > 0:
                await asyncio.sleep(delay)
            yield event

    async def stream_response(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        async for chunk in self.body_iterator:
            body = chunk.encode() if isinstance(chunk, str) else bytes(chunk)
            await send({"type": "http.response.body", "body": body, "more_body": True})
        if not self._complete:
            # Returning with the body unfinished makes the ASGI server close the connection,
            # which is what a dropped upstream looks like to the client.
            logger.warning("simulated truncate fault: closing the connection mid-stream")
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        if self._on_complete is not None:
            self._on_complete()


class TruncatedResponse(Response):
    """A JSON response whose ``content-length`` promises more than is ever sent."""

    def __init__(self, content: dict[str, Any], headers: Mapping[str, str] | None = None) -> None:
        full = JSONResponse(content).body
        super().__init__(
            full,
            headers={**request_id_headers(), **(headers or {})},
            media_type="application/json",
        )
        self._sent = full[: len(full) // 2]

    async def __call__(self, scope: Any, receive: Any, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        await send({"type": "http.response.body", "body": self._sent, "more_body": True})
        logger.warning("simulated truncate fault: closing the connection mid-body")
