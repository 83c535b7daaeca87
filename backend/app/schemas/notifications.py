"""Requests and responses of ``/api/v1/notifications``: channels, subscriptions, dead letters.

Secrets are write-only: a webhook's signing secret is returned once, in the response that
created the channel; a Slack webhook URL and an SMTP password are never returned.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr

from app.models import USER_ID_PATTERN
from app.schemas.text import StorableText

ChannelKind = Literal["webhook", "slack", "email"]
EventKindName = Literal[
    "*",
    "budget.soft_threshold",
    "budget.exhausted",
    "task.succeeded",
    "task.failed",
    "model.unpriced",
    "usage.anomaly",
    "budget.forecast_over",
]
MAX_URL_CHARS = 2000
_EMAIL = re.compile(r"^[^@\s<>\",;]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$")
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?$|^\[[0-9A-Fa-f:.]+\]$")


def outbound_url(value: str) -> str:
    """An http(s) URL with a host and no credentials in it; anything else is refused."""
    if len(value) > MAX_URL_CHARS or any(c.isspace() or ord(c) < 32 for c in value):
        raise ValueError("must be an http:// or https:// URL without spaces")
    try:
        parts = urlsplit(value)
        port = parts.port  # an invalid port raises here
    except ValueError as exc:
        raise ValueError("must be a valid http:// or https:// URL") from exc
    if parts.scheme not in ("http", "https"):
        raise ValueError("only http:// and https:// URLs are allowed")
    if not parts.hostname:
        raise ValueError("must name a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials (user:password@)")
    del port
    return value


def email_address(value: str) -> str:
    if len(value) > 254 or not _EMAIL.match(value):
        raise ValueError("must be an e-mail address (name@example.org)")
    return value


def host_name(value: str) -> str:
    if not _HOST.match(value):
        raise ValueError("must be a host name or address")
    return value


OutboundURL = Annotated[str, AfterValidator(outbound_url)]
EmailAddress = Annotated[str, AfterValidator(email_address)]
HostName = Annotated[str, AfterValidator(host_name)]
Secret = Annotated[SecretStr, Field(min_length=1, max_length=1000)]


class WebhookTarget(BaseModel):
    """A JSON POST signed with HMAC-SHA256 (see docs/NOTIFICATIONS.md for the headers)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["webhook"]
    url: OutboundURL = Field(examples=["https://hooks.example.org/asa"])
    signing_secret: Annotated[SecretStr, Field(min_length=16, max_length=1000)] | None = Field(
        default=None,
        description="At least 16 characters; unset: one is generated and returned once.",
    )


class SlackTarget(BaseModel):
    """A Slack incoming webhook; its URL is a credential, never returned."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["slack"]
    webhook_url: Annotated[SecretStr, AfterValidator(lambda v: _secret_url(v))]


def _secret_url(value: SecretStr) -> SecretStr:
    outbound_url(value.get_secret_value())
    return value


class EmailTarget(BaseModel):
    """E-mail over SMTP (``starttls`` on 587, ``ssl`` on 465, ``none`` for a local relay)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["email"]
    host: HostName
    port: int = Field(default=587, ge=1, le=65535)
    security: Literal["starttls", "ssl", "none"] = "starttls"
    username: StorableText | None = Field(default=None, min_length=1, max_length=254)
    password: Secret | None = None
    from_addr: EmailAddress
    to: list[EmailAddress] = Field(min_length=1, max_length=20)


ChannelTarget = Annotated[WebhookTarget | SlackTarget | EmailTarget, Field(discriminator="kind")]


class ChannelCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StorableText = Field(min_length=1, max_length=100)
    target: ChannelTarget
    enabled: bool = True
    user_selectable: bool = Field(
        default=False, description="Users may subscribe their own events to this channel."
    )


class ChannelUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StorableText | None = Field(default=None, min_length=1, max_length=100)
    enabled: bool | None = None
    user_selectable: bool | None = None


class ChannelOut(BaseModel):
    id: str
    name: str
    kind: ChannelKind
    enabled: bool
    user_selectable: bool
    created_at: datetime
    created_by: str | None = Field(description="Shown to administrators only.")
    config: dict[str, Any] | None = Field(
        description="The non-secret settings (URL, SMTP host, recipients); administrators only."
    )
    has_secret: bool = Field(description="A secret is stored (never returned).")


class ChannelCreated(ChannelOut):
    signing_secret: str | None = Field(
        description="The webhook's signing secret, shown this once; null for other kinds."
    )


class ChannelList(BaseModel):
    items: list[ChannelOut]


class SubscriptionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    channel_id: str = Field(min_length=1, max_length=32, pattern=r"^[0-9a-f]{1,32}$")
    event_kind: EventKindName = Field(description="One kind of event, or * for every kind.")
    user_id: str | None = Field(
        default=None,
        pattern=USER_ID_PATTERN,
        description="Whose events: yours by default; administrators may name anyone, or set "
        "all_users.",
    )
    all_users: bool = Field(default=False, description="Everyone's events (administrators).")
    recipient: EmailAddress | None = Field(
        default=None, description="An e-mail channel's address for this subscription."
    )


class SubscriptionOut(BaseModel):
    id: str
    channel_id: str
    channel_name: str
    event_kind: str
    user_id: str | None = Field(description="Whose events; null: everyone's.")
    recipient: str | None
    created_by: str
    created_at: datetime


class SubscriptionList(BaseModel):
    items: list[SubscriptionOut]


class TestResult(BaseModel):
    delivered: bool
    event_id: str
    error: str | None = Field(description="Why the receiver refused it, if it did.")


class DeadLetter(BaseModel):
    id: str
    event_id: str
    event_kind: str
    channel_id: str
    channel_name: str
    recipient: str | None
    attempts: int
    last_error: str | None
    created_at: datetime
    failed_at: datetime = Field(description="When the last try failed.")


class DeadLetterList(BaseModel):
    items: list[DeadLetter]
    limit: int
    offset: int


class DeliveryOut(BaseModel):
    id: str
    event_id: str
    channel_id: str
    state: Literal["pending", "sending", "delivered", "dead"]
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
