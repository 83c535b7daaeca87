"""Requests and responses of ``/api/v1/admin/keys``."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from app.models import NAME_MAX_CHARS, USER_ID_PATTERN
from app.models.api_keys import MAX_ALLOWED_MODELS, MODEL_MAX_CHARS
from app.schemas.text import StorableText


def _as_utc(value: datetime) -> datetime:
    # SQLite hands timestamps back naive; they were written in UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


UTCDatetime = Annotated[datetime, AfterValidator(_as_utc)]
ModelName = Annotated[
    str, Field(min_length=1, max_length=MODEL_MAX_CHARS, pattern=r"^[^\x00-\x1f\x7f]+$")
]
AllowedModels = Annotated[list[ModelName], Field(max_length=MAX_ALLOWED_MODELS)]
BudgetUSD = Annotated[Decimal, Field(ge=0, le=Decimal(1_000_000), decimal_places=12)]


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
    allowed_models: AllowedModels | None = Field(
        default=None,
        description="The only models the key may call through the gateway (/v1); null: any.",
        examples=[["gpt-4o-mini", "text-embedding-3-small"]],
    )
    budget_usd: BudgetUSD | None = Field(
        default=None,
        description="The key's own budget in USD over its whole life (0 refuses every call); "
        "null: none (its user's and the global budgets still apply).",
        examples=["25.00"],
    )


class ApiKeyUpdate(BaseModel):
    """A change to a key's limits; a field left out keeps its value, null removes it."""

    model_config = ConfigDict(extra="forbid")

    allowed_models: AllowedModels | None = None
    budget_usd: BudgetUSD | None = None


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
    allowed_models: list[str] | None = Field(
        default=None, description="The models the key may call through the gateway; null: any."
    )
    budget_usd: Decimal | None = Field(
        default=None, description="The key's own budget (USD, whole life); null: none."
    )
    budget_spent_usd: Decimal | None = Field(
        default=None, description="What the key spent since its budget was set; null: no budget."
    )


class ApiKeyCreated(ApiKeyView):
    key: str = Field(description="The API key. It is shown this once and cannot be recovered.")


class ApiKeyList(BaseModel):
    items: list[ApiKeyView]
