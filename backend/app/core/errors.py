"""The small hierarchy of errors we expect, and the one handler that renders them.

Every expected condition becomes ``{"error": <code>, "detail": <message>, ...}`` with its status;
anything unexpected becomes a 500 with a generic body (the traceback goes to the log only).
"""

from __future__ import annotations

import logging
import math
from datetime import date
from decimal import Decimal
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("Unhandled error")
        return JSONResponse(
            {"error": "internal_error", "detail": "An unexpected error occurred."}, status_code=500
        )
