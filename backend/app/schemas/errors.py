"""The error bodies every route may answer with, for the OpenAPI schema.

``app.core.errors`` renders them; ``ERROR_RESPONSES`` documents them on every router so that
clients (and the schema-driven tests) know the shapes of 401, 403, 404, 413, 422 and 429.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class ErrorBody(BaseModel):
    """``{"error": <code>, "detail": <message>}``, with extra fields for some codes."""

    model_config = ConfigDict(extra="allow")

    error: str
    detail: str


class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str | None


class ValidationErrorBody(BaseModel):
    error: str
    detail: list[ValidationIssue]


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing, unknown or revoked API key"},
    403: {"model": ErrorBody, "description": "The key's user or role may not do this"},
    404: {"model": ErrorBody, "description": "Not found (or not yours)"},
    413: {"model": ErrorBody, "description": "Request body too large"},
    422: {"model": ValidationErrorBody | ErrorBody, "description": "Malformed input"},
    429: {"model": ErrorBody, "description": "Too many requests; see Retry-After"},
}
