"""Errors of the ``/v1`` routes, in the OpenAI API's shape.

``{"error": {"message", "type", "param", "code", ...}}`` with the status the OpenAI API uses, so
the SDKs raise their usual exceptions (401 ``AuthenticationError``, 402/403
``PermissionDeniedError``-like ``APIStatusError``, 404 ``NotFoundError``...). A budget refusal is
402 (no SDK retries it) with ``type``/``code`` ``budget_exceeded`` and the scope, limit and spend.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from app.core.errors import AppError, BudgetExceededError

# The ``type`` OpenAI gives each status.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class GatewayError(Exception):
    """An error the gateway answers itself (nothing was forwarded, or nothing more will be)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        type_: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type_ or _TYPES.get(status, "api_error")
        self.param = param
        self.headers = headers
        self.extra = extra

    def response(self) -> JSONResponse:
        return error_response(
            self.status,
            self.message,
            code=self.code,
            type_=self.type,
            param=self.param,
            headers=self.headers,
            **self.extra,
        )


def error_body(
    message: str, *, code: str | None, type_: str, param: str | None = None, **extra: Any
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code, **extra}}


def error_response(
    status: int,
    message: str,
    *,
    code: str | None,
    type_: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = error_body(
        message, code=code, type_=type_ or _TYPES.get(status, "api_error"), param=param, **extra
    )
    return JSONResponse(body, status_code=status, headers=headers)


def from_app_error(exc: AppError) -> GatewayError:
    """One of the service's own errors (auth, budgets, unavailable), in the OpenAI shape."""
    if isinstance(exc, BudgetExceededError):
        return GatewayError(
            402,
            str(exc),
            code="budget_exceeded",
            type_="budget_exceeded",
            scope=exc.scope,
            subject_id=exc.subject_id,
            limit_usd=format(exc.limit_usd, "f"),
            spent_usd=format(exc.spent_usd, "f"),
            reserved_usd=format(exc.reserved_usd, "f"),
            remaining_usd=format(exc.remaining_usd, "f"),
            requested_usd=format(exc.requested_usd, "f"),
        )
    code = {401: "invalid_api_key", 403: "permission_denied", 503: "service_unavailable"}
    return GatewayError(
        exc.status_code, str(exc), code=code.get(exc.status_code, exc.code), headers=exc.headers
    )
