"""The small hierarchy of errors we expect, and the one handler that renders them.

Every expected condition becomes ``{"error": <code>, "detail": <message>, ...}`` with its status;
anything unexpected becomes a 500 with a generic body, and the log gets its type and traceback
frames but never its message (``describe_unexpected``: a message can quote the request).
"""

from __future__ import annotations

import logging
import math
import traceback
from datetime import date
from decimal import Decimal
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.redaction import redact

logger = logging.getLogger(__name__)
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


class AppError(Exception):
    status_code = 400
    code = "bad_request"
    headers: dict[str, str] | None = None

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class NotFound(AppError):
    status_code = 404
    code = "not_found"


class Forbidden(AppError):
    status_code = 403
    code = "forbidden"


class Unauthorized(AppError):
    status_code = 401
    code = "unauthorized"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.headers = {"WWW-Authenticate": "Bearer"}


class Conflict(AppError):
    status_code = 409
    code = "conflict"


class InvalidInput(AppError):
    status_code = 422
    code = "invalid_input"


class ServiceUnavailable(AppError):
    status_code = 503
    code = "unavailable"


class TooManyRequests(AppError):
    status_code = 429
    code = "rate_limited"

    def __init__(self, detail: str, *, retry_after_seconds: float) -> None:
        retry_after = max(1, math.ceil(retry_after_seconds))
        super().__init__(detail, retry_after_seconds=retry_after)
        self.headers = {"Retry-After": str(retry_after)}


class QueueFull(AppError):
    """The user already has ``TASK_MAX_QUEUED_PER_USER`` tasks waiting; nothing was queued."""

    status_code = 429
    code = "queue_full"


class BudgetExceededError(AppError):
    """A call would take a budget past its limit; it was refused before reaching the provider.

    The 402 body carries the scope, its subject (task or user id; null for the global scope),
    the window (UTC; null for a task, whose budget covers its whole life) and, in USD as exact
    decimal strings, the limit, spent, reserved (by calls in flight), remaining and requested.
    """

    status_code = 402
    code = "budget_exceeded"

    def __init__(
        self,
        *,
        scope: str,
        subject_id: str | None,
        window_start: date | None,
        window_end: date | None,
        limit_usd: Decimal,
        spent_usd: Decimal,
        reserved_usd: Decimal,
        requested_usd: Decimal,
    ) -> None:
        self.scope = scope
        self.subject_id = subject_id
        self.limit_usd = limit_usd
        self.spent_usd = spent_usd
        self.reserved_usd = reserved_usd
        self.requested_usd = requested_usd
        self.remaining_usd = max(limit_usd - spent_usd - reserved_usd, Decimal(0))
        who = f" of {subject_id}" if subject_id else ""
        super().__init__(
            f"Budget {scope}{who} exceeded: limit ${limit_usd:f}, spent ${spent_usd:f}, "
            f"reserved ${reserved_usd:f}, remaining ${self.remaining_usd:f}; "
            f"this call may cost up to ${requested_usd:f}.",
            scope=scope,
            subject_id=subject_id,
            window_start=window_start.isoformat() if window_start else None,
            window_end=window_end.isoformat() if window_end else None,
            limit_usd=format(limit_usd, "f"),
            spent_usd=format(spent_usd, "f"),
            reserved_usd=format(reserved_usd, "f"),
            remaining_usd=format(self.remaining_usd, "f"),
            requested_usd=format(requested_usd, "f"),
        )


class BudgetUnavailableError(AppError):
    """Budgets are configured but cannot be checked (the database is unreachable)."""

    status_code = 503
    code = "budget_unavailable"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(_request: Request, exc: AppError) -> JSONResponse:
        body = {"error": exc.code, "detail": redact(exc.detail), **exc.extra}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Raised by the framework itself: unknown route, wrong method, body over the limit.
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        body = {"error": code, "detail": redact(str(exc.detail))}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {
                # A key may be a submitted field's name, so locations are redacted too.
                "loc": [redact(p) if isinstance(p, str) else p for p in e.get("loc", ())],
                "msg": redact(str(e.get("msg", ""))),
                "type": e.get("type"),
            }
            for e in exc.errors()
        ]
        return JSONResponse({"error": "invalid_input", "detail": errors}, status_code=422)

    app.add_middleware(UnexpectedErrorMiddleware)


class UnexpectedErrorMiddleware:
    """Answers 500 ``internal_error`` to any exception the handlers above do not render, and
    logs it with ``describe_unexpected`` only.

    Middleware rather than an ``Exception`` handler: Starlette re-raises after running such a
    handler, and the server then logs the exception's message (which may quote the request).
    An exception after the response has started ends the response where it is.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as exc:
            logger.error("Unhandled error: %s", describe_unexpected(exc))
            if started:
                return
            response = JSONResponse(
                {"error": "internal_error", "detail": "An unexpected error occurred."},
                status_code=500,
            )
            await response(scope, receive, send)


def describe_unexpected(exc: BaseException) -> str:
    """What the log may say about an unexpected error: its type, where it was raised, and for a
    database error its SQLSTATE and SQL text, never its message.

    A message can quote what the caller sent (a database driver's error names the offending
    value, pydantic's quotes the input), so none is written; the traceback's frames are enough
    to find the fault, and the request can be replayed to see the value.
    """
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        kind = type(current)
        line = f"{kind.__module__}.{kind.__qualname__}"
        if isinstance(current, DBAPIError):
            sqlstate = getattr(current.orig, "sqlstate", None) or getattr(
                current.orig, "sqlite_errorname", None
            )
            line += f" (driver error {type(current.orig).__name__}, sqlstate {sqlstate})"
            line += f"\n  statement: {' '.join(str(current.statement or '').split())[:1000]}"
        frames = traceback.extract_tb(current.__traceback__)
        line += "".join(f"\n  at {f.filename}:{f.lineno} in {f.name}" for f in frames)
        parts.append(line)
        current = current.__cause__ or current.__context__
    return "\ncaused by: ".join(parts)
