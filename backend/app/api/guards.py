"""Guards against hostile input: a request body size limit and per-key submission rate."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import Depends, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.auth import Principal, current_principal, get_access
from app.core.errors import TooManyRequests

DEFAULT_MAX_BODY_BYTES = 1024 * 1024


class BodySizeLimitMiddleware:
    """Answers 413 to a request whose body exceeds ``MAX_REQUEST_BODY_BYTES``.

    A declared ``Content-Length`` over the limit is refused before a byte is read; otherwise the
    body is read (at most the limit) before the application runs, so a chunked body cannot get
    past it either. The limit is the running service's (``app.state.access``). Written by hand:
    Starlette has no body limit and this is one small ASGI wrapper.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = _max_body_bytes(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _too_large(send, limit)
            return
        chunks: list[bytes] = []
        size = 0
        pending: Message | None = None
        while True:
            message = await receive()
            if message["type"] != "http.request":
                pending = message  # the client went away; let the application see it
                break
            body: bytes = message.get("body", b"")
            size += len(body)
            if size > limit:
                await _too_large(send, limit)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            if pending is not None:
                return pending
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


def _max_body_bytes(scope: Scope) -> int:
    app = scope.get("app")
    access = getattr(getattr(app, "state", None), "access", None)
    limit = getattr(access, "max_body_bytes", None)
    return limit if isinstance(limit, int) else DEFAULT_MAX_BODY_BYTES


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _too_large(send: Send, limit: int) -> None:
    body = json.dumps(
        {
            "error": "payload_too_large",
            "detail": f"The request body exceeds the limit of {limit} bytes.",
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def limit_task_submissions(
    request: Request, principal: Annotated[Principal, Depends(current_principal)]
) -> None:
    """Spend one of the caller's task-submission tokens, or answer 429 with Retry-After."""
    limiter = get_access(request).submit_limiter
    if limiter is None:
        return
    wait = limiter.acquire(principal.key_id or f"user:{principal.user_id}")
    if wait > 0:
        raise TooManyRequests(
            "Too many task submissions with this API key; retry later.", retry_after_seconds=wait
        )
