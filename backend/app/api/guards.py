"""Guards against hostile input: a request body size limit and per-key submission rate."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.middleware.body_limit import RequestBodyLimitResponder
from starlette.types import ASGIApp, Receive, Scope, Send

from app.access.principal import Principal
from app.api.auth import current_principal, get_access
from app.core.errors import TooManyRequests

DEFAULT_MAX_BODY_BYTES = 1024 * 1024


class BodySizeLimitMiddleware:
    """Answers 413 to a request whose body exceeds the service's ``MAX_REQUEST_BODY_BYTES``.

    A declared Content-Length over the limit is answered here, before a byte is read; any
    other body is counted by Starlette's ``RequestBodyLimitResponder`` as the application reads
    it (its 413 is rendered by the error handler). The limit is the running service's
    (``app.state.access``), known after start-up, not when the application object is built.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = _max_body_bytes(scope)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            response = JSONResponse(
                {"error": "payload_too_large", "detail": f"The body exceeds {limit} bytes."},
                status_code=413,
            )
            await response(scope, receive, send)
            return
        await RequestBodyLimitResponder(self.app, limit)(scope, receive, send)


def _max_body_bytes(scope: Scope) -> int:
    access = getattr(getattr(scope.get("app"), "state", None), "access", None)
    limit = getattr(access, "max_body_bytes", None)
    return limit if isinstance(limit, int) else DEFAULT_MAX_BODY_BYTES


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
