"""Real receivers on loopback: a webhook server that verifies signatures and counts deliveries,
and an SMTP server (aiosmtpd); settings and helpers for a fast dispatcher."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import Engine, select

from app.access.principal import Principal
from app.core.config import Settings
from app.core.db import create_db_engine, create_session_factory, transaction
from app.models import NotificationDelivery, NotificationEvent
from app.notifications import service
from app.notifications.dispatcher import NotificationDispatcher
from app.notifications.events import Event, EventKind, event_id
from app.notifications.outbox import record_event
from app.notifications.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from app.schemas.notifications import ChannelCreate, SubscriptionCreate

ADMIN = Principal("root", "admin")
SECRET = "whsec_test-secret-for-the-receiver-0001"


@dataclass
class Received:
    event_id: str
    body: bytes
    valid: bool


@dataclass
class WebhookReceiver:
    """An HTTP server that verifies each request's signature and timestamp (401 if wrong).

    ``status``: what it answers (503 to play a failing receiver); ``down()`` / ``up()`` close
    and reopen its port (connections refused meanwhile); ``on_receive`` runs after a request was
    read and before it is answered.
    """

    secret: str = SECRET
    verify_signatures: bool = True
    status: int = 200
    received: list[Received] = field(default_factory=list)
    on_receive: Callable[[Received], None] | None = None
    port: int = 0
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def up(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                valid = not receiver.verify_signatures or verify(
                    receiver.secret,
                    self.headers.get(TIMESTAMP_HEADER),
                    self.headers.get(SIGNATURE_HEADER),
                    body,
                )
                event_id = self.headers.get("ASA-Event-Id") or ""
                item = Received(event_id, body, valid)
                with receiver._lock:
                    receiver.received.append(item)
                if receiver.on_receive is not None:
                    receiver.on_receive(item)
                self.send_response(receiver.status if valid else 401)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def ids(self, *, valid_only: bool = True) -> Counter[str]:
        with self._lock:
            return Counter(r.event_id for r in self.received if r.valid or not valid_only)

    def bodies(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(r.body) for r in self.received]


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver().up()
    yield receiver
    receiver.down()


class _Mailbox:
    def __init__(self) -> None:
        self.messages: list[tuple[list[str], Message]] = []

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:
        content = envelope.content if isinstance(envelope.content, bytes) else b""
        self.messages.append((list(envelope.rcpt_tos), message_from_bytes(content)))
        return "250 Message accepted for delivery"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class SmtpReceiver:
    port: int
    mailbox: _Mailbox


@pytest.fixture
def smtp() -> Iterator[SmtpReceiver]:
    mailbox = _Mailbox()
    controller = Controller(mailbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield SmtpReceiver(controller.port, mailbox)
    controller.stop()


# -- a fast dispatcher on the test database ---------------------------------------------------


FAST = {
    "notification_poll_interval_seconds": 0.05,
    "notification_backoff_base_seconds": 0.1,
    "notification_backoff_max_seconds": 0.4,
    "notification_send_timeout_seconds": 1.0,
    "notification_lease_seconds": 4.0,
    "notification_max_attempts": 4,
    "notification_concurrency": 2,
}


def notify_settings(database_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "auto_migrate": False,
        "spool_dir": tmp_path / "spool",
        **FAST,
        **overrides,
    }
    return Settings(**values)


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return notify_settings(database_url, tmp_path)


@pytest.fixture
def db(database_url: str) -> Iterator[Engine]:
    engine = create_db_engine(database_url)
    yield engine
    engine.dispose()


def add_webhook(
    engine: Engine,
    url: str,
    *,
    kind: str = "*",
    user_id: str | None = None,
    name: str = "hook",
    secret: str = SECRET,
) -> str:
    """A webhook channel subscribed to ``kind`` of everyone's (or ``user_id``'s) events."""
    with transaction(create_session_factory(engine)) as session:
        channel = service.create_channel(
            session,
            ADMIN,
            ChannelCreate.model_validate(
                {"name": name, "target": {"kind": "webhook", "url": url, "signing_secret": secret}}
            ),
        )
        service.create_subscription(
            session,
            ADMIN,
            SubscriptionCreate.model_validate(
                {
                    "channel_id": channel.id,
                    "event_kind": kind,
                    "user_id": user_id,
                    "all_users": user_id is None,
                }
            ),
        )
    return channel.id


def delivery_states(engine: Engine) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(s for (s,) in conn.execute(select(NotificationDelivery.state)))


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def add_events(
    engine: Engine, count: int, *, user: str | None = None, prefix: str = "e"
) -> list[str]:
    ids = []
    with engine.begin() as conn:
        for i in range(count):
            event = Event(
                id=event_id("task.finished", f"{prefix}{i}"),
                kind=EventKind.TASK_SUCCEEDED,
                data={
                    "task_id": f"{prefix}{i}",
                    "status": "succeeded",
                    "reason": None,
                    "repo_url": "https://example.org/r.git",
                    "attempts": 1,
                    "cost_usd": "0.01",
                },
                subject_user_id=user,
            )
            record_event(conn, event)
            ids.append(event.id)
    return ids


def drain(dispatcher: NotificationDispatcher, engine: Engine, timeout: float = 20.0) -> None:
    """Rounds until nothing is pending or sending."""

    def done() -> bool:
        dispatcher.run_once()
        states = delivery_states(engine)
        with engine.connect() as conn:
            pending_events = conn.scalar(
                select(NotificationEvent.id).where(NotificationEvent.state == "pending")
            )
        return pending_events is None and not states["pending"] and not states["sending"]

    wait_for(done, timeout)
