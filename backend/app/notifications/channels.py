"""Channels: what each kind stores, and how one delivery is sent, within bounded time.

- ``webhook``: ``POST`` of the event's JSON (the exact bytes stored in the outbox, the same on
  every retry), signed (``app.notifications.signing``); any 2xx is delivered.
- ``slack``: ``POST {"text": ...}`` to a Slack incoming webhook; any 2xx is delivered.
- ``email``: one message over SMTP (``smtplib``; STARTTLS, implicit TLS or none for a local
  relay), to the subscription's recipient or the channel's list.

Redirects are not followed (the URL an administrator set is the one called). Every network
step is bounded by ``NOTIFICATION_SEND_TIMEOUT_SECONDS``. A failure is raised as
``DeliveryFailed`` with a description that never carries the channel's secret.
"""

from __future__ import annotations

import json
import smtplib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any
from urllib.parse import urlsplit

import httpx2

from app.notifications import signing
from app.notifications.events import Event, EventKind, render_text
from app.schemas.notifications import ChannelTarget, EmailTarget, SlackTarget, WebhookTarget

MAX_ERROR_CHARS = 500
USER_AGENT = "ASA-Notifications/1"


class DeliveryFailed(Exception):
    """A delivery did not reach its receiver; ``str()`` is safe to store and show."""


@dataclass(frozen=True, slots=True)
class Channel:
    """A channel as the dispatcher and the API read it (``secret`` never leaves the process)."""

    id: str
    name: str
    kind: str
    config: Mapping[str, Any]
    secret: str | None
    enabled: bool
    user_selectable: bool
    created_by: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class StoredTarget:
    """What a new channel stores: its public ``config``, its ``secret``, and the secret to show
    once (the webhook's signing secret; never the others)."""

    config: dict[str, Any]
    secret: str | None
    show_once: str | None


def stored_target(target: ChannelTarget) -> StoredTarget:
    if isinstance(target, WebhookTarget):
        given = target.signing_secret.get_secret_value() if target.signing_secret else None
        secret = given or signing.new_signing_secret()
        return StoredTarget({"url": target.url}, secret, secret)
    if isinstance(target, SlackTarget):
        url = target.webhook_url.get_secret_value()
        # The URL is the credential: only its host is kept in the open.
        return StoredTarget({"host": urlsplit(url).hostname}, url, None)
    assert isinstance(target, EmailTarget)
    config = target.model_dump(exclude={"kind", "password"})
    password = target.password.get_secret_value() if target.password else None
    return StoredTarget(config, password, None)


def event_from_payload(payload: str) -> Event:
    body = json.loads(payload)
    return Event(
        id=body["id"],
        kind=EventKind(body["kind"]),
        data=body.get("data") or {},
        subject_user_id=body.get("subject_user_id"),
        created_at=datetime.fromisoformat(body["created_at"]),
    )


def _safe(text: str, secret: str | None) -> str:
    """``text`` without the secret, nor (a Slack URL's credential) the secret URL's path and
    query, which a receiver's error page may echo."""
    if secret:
        parts = urlsplit(secret)
        for fragment in (secret, parts.path, parts.query):
            if len(fragment) >= 8:
                text = text.replace(fragment, "***")
    return text[:MAX_ERROR_CHARS]


class Sender:
    """Sends deliveries; one per dispatcher (its HTTP connections are reused). Thread-safe."""

    def __init__(self, timeout_seconds: float) -> None:
        self.timeout = timeout_seconds
        self._http = httpx2.Client(
            timeout=httpx2.Timeout(timeout_seconds),
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT},
        )

    def close(self) -> None:
        self._http.close()

    def send(self, channel: Channel, payload: str, recipient: str = "") -> None:
        """Deliver the stored event ``payload`` over ``channel``; ``DeliveryFailed`` if not."""
        try:
            if channel.kind == "webhook":
                self._webhook(channel, payload)
            elif channel.kind == "slack":
                self._slack(channel, payload)
            elif channel.kind == "email":
                self._email(channel, payload, recipient)
            else:
                raise DeliveryFailed(f"unknown channel kind {channel.kind!r}")
        except DeliveryFailed:
            raise
        except Exception as exc:  # any failure is a failed try; its text may quote the secret
            raise DeliveryFailed(_safe(f"{type(exc).__name__}: {exc}", channel.secret)) from None

    def _post(self, channel: Channel, url: str, body: bytes, headers: dict[str, str]) -> None:
        response = self._http.post(url, content=body, headers=headers)
        if not 200 <= response.status_code < 300:
            raise DeliveryFailed(
                _safe(f"HTTP {response.status_code} {response.text[:200]}".strip(), channel.secret)
            )

    def _webhook(self, channel: Channel, payload: str) -> None:
        body = payload.encode()
        event_id = json.loads(payload)["id"]
        headers = {"Content-Type": "application/json"}
        headers.update(signing.signed_headers(channel.secret or "", event_id, body))
        self._post(channel, str(channel.config["url"]), body, headers)

    def _slack(self, channel: Channel, payload: str) -> None:
        subject, text = render_text(event_from_payload(payload))
        body = json.dumps({"text": f"*{subject}*\n{text}"}).encode()
        self._post(channel, channel.secret or "", body, {"Content-Type": "application/json"})

    def _email(self, channel: Channel, payload: str, recipient: str) -> None:
        config = channel.config
        event = event_from_payload(payload)
        subject, text = render_text(event)
        recipients = [recipient] if recipient else list(config["to"])
        message = EmailMessage()
        message["Subject"] = subject
        message["From"] = config["from_addr"]
        message["To"] = ", ".join(recipients)
        message["Message-ID"] = make_msgid(domain=str(config["from_addr"]).rsplit("@", 1)[-1])
        message["X-ASA-Event-Id"] = event.id
        message.set_content(f"{text}\n\n{json.dumps(event.body(), indent=2, default=str)}\n")
        host, port = str(config["host"]), int(config["port"])
        context = ssl.create_default_context()
        smtp: smtplib.SMTP
        if config["security"] == "ssl":
            smtp = smtplib.SMTP_SSL(host, port, timeout=self.timeout, context=context)
        else:
            smtp = smtplib.SMTP(host, port, timeout=self.timeout)
        with smtp:
            if config["security"] == "starttls":
                smtp.starttls(context=context)
            if config.get("username"):
                smtp.login(str(config["username"]), channel.secret or "")
            smtp.send_message(message, from_addr=config["from_addr"], to_addrs=recipients)
