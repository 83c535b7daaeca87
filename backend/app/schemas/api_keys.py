"""Requests and responses of ``/api/v1/admin/keys``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from app.models import NAME_MAX_CHARS, USER_ID_PATTERN
from app.schemas.text import StorableText


def _as_utc(value: datetime) -> datetime:
    # SQLite hands timestamps back naive; they were written in UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


UTCDatetime = Annotated[datetime, AfterValidator(_as_utc)]


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(
        pattern=USER_ID_PATTERN,
        description="1-64 characters: letters, digits and . _ : @ - (not first).",
        examples=["alice"],
    )
    role: Literal["user", "admin"] = "user"
    name: StorableText | None = Field(
        default=None,
        max_length=NAME_MAX_CHARS,
        pattern=r"^[^\x00-\x1f\x7f]*$",
        description="A label for people (where the key is used).",
        examples=["alice's laptop"],
    )


class ApiKeyView(BaseModel):
    """A key as listed: never the key itself, only its public prefix."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    user_id: str
    role: Literal["user", "admin"]
    name: str | None
    prefix: str = Field(description="The key starts with asa_<prefix>_")
    created_at: UTCDatetime
    last_used_at: UTCDatetime | None = Field(description="Accurate to a minute")
    revoked_at: UTCDatetime | None


class ApiKeyCreated(ApiKeyView):
    key: str = Field(description="The API key. It is shown this once and cannot be recovered.")


class ApiKeyList(BaseModel):
    items: list[ApiKeyView]
