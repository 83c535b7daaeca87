"""The dispatcher delivers every event at least once, to real receivers on loopback."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from app.core.config import Settings
from app.core.db import create_db_engine, create_session_factory, transaction
from app.models import NotificationDelivery, NotificationEvent
from app.notifications import service, store
from app.notifications.dispatcher import NotificationDispatcher
from app.schemas.notifications import ChannelCreate, SubscriptionCreate
from tests.notifications.conftest import (
    ADMIN,
    SmtpReceiver,
    WebhookReceiver,
    add_events,
    add_webhook,
    delivery_states,
    drain,
    notify_settings,
    wait_for,
)
from tests.support.reliability import DatabaseOutage, PostgresOutage, SqliteOutage

BACKEND = Path(__file__).resolve().parents[2]


@pytest.fixture
def dispatchers() -> Iterator[list[NotificationDispatcher]]:
    made: list[NotificationDispatcher] = []
    yield made
    for dispatcher in made:
        dispatcher.stop(timeout=10)


@pytest.fixture
def dispatcher(
    db: Engine, settings: Settings, dispatchers: list[NotificationDispatcher]
) -> NotificationDispatcher:
    made = NotificationDispatcher(db, settings)
    dispatchers.append(made)
    return made


def test_a_webhook_receives_each_event_signed_with_its_id(
    db: Engine, webhook: WebhookReceiver, dispatcher: NotificationDispatcher
) -> None:
    add_webhook(db, webhook.url)
    ids = add_events(db, 3)

    drain(dispatcher, db)

    assert webhook.ids() == dict.fromkeys(ids, 1)
    body = webhook.bodies()[0]
    assert body["kind"] == "task.succeeded" and body["data"]["cost_usd"] == "0.01"
    assert delivery_states(db) == {"delivered": 3}


def test_a_wrong_secret_is_rejected_by_the_receiver_and_retried(
    db: Engine, webhook: WebhookReceiver, dispatcher: NotificationDispatcher
) -> None:
    add_webhook(db, webhook.url, secret="whsec_not-the-receivers-secret")
    add_events(db, 1)
    dispatcher.run_once()
    assert webhook.ids() == {} and len(webhook.received) == 1
    with db.connect() as conn:
        (row,) = conn.execute(select(NotificationDelivery))
    assert (row.state, row.attempts, row.last_error) == ("pending", 1, "HTTP 401")


def test_a_users_subscription_gets_only_that_users_events(
    db: Engine, webhook: WebhookReceiver, dispatcher: NotificationDispatcher
) -> None:
    add_webhook(db, webhook.url, kind="task.succeeded", user_id="alice")
    mine = add_events(db, 2, user="alice", prefix="a")
    add_events(db, 2, user="bob", prefix="b")

    drain(dispatcher, db)

    assert webhook.ids() == dict.fromkeys(mine, 1)
    with db.connect() as conn:
        states = dict(conn.execute(select(NotificationEvent.id, NotificationEvent.state)).all())
    assert sorted(states.values()) == ["dispatched", "dispatched", "dropped", "dropped"]


def test_slack_and_email_channels_deliver(
    db: Engine,
    webhook: WebhookReceiver,
    smtp: SmtpReceiver,
    dispatcher: NotificationDispatcher,
) -> None:
    webhook.verify_signatures = False  # playing Slack: no signature
    with transaction(create_session_factory(db)) as session:
        for name, target in (
            ("slack", {"kind": "slack", "webhook_url": webhook.url}),
            (
                "mail",
                {
                    "kind": "email",
                    "host": "127.0.0.1",
                    "port": smtp.port,
                    "security": "none",
                    "from_addr": "asa@example.org",
                    "to": ["team@example.org"],
                },
            ),
        ):
            channel = service.create_channel(
                session, ADMIN, ChannelCreate.model_validate({"name": name, "target": target})
            )
            service.create_subscription(
                session,
                ADMIN,
                SubscriptionCreate(channel_id=channel.id, event_kind="*", all_users=True),
            )
    (event,) = add_events(db, 1)

    drain(dispatcher, db)

    (slack,) = webhook.bodies()
    assert "Task e0 succeeded" in slack["text"] and event in slack["text"]
    ((recipients, message),) = smtp.mailbox.messages
    assert recipients == ["team@example.org"]
    assert message["Subject"] == "[ASA] Task e0 succeeded"
    assert message["X-ASA-Event-Id"] == event


def test_a_receiver_down_for_a_while_gets_the_event_after_retries_with_backoff(
    db: Engine,
    webhook: WebhookReceiver,
    settings: Settings,
    dispatchers: list[NotificationDispatcher],
) -> None:
    add_webhook(db, webhook.url)
    webhook.down()  # connections refused
    (event,) = add_events(db, 1)
    dispatcher = NotificationDispatcher(
        db, settings.model_copy(update={"notification_max_attempts": 20})
    )
    dispatchers.append(dispatcher)
    waits: dict[int, float] = {}  # try number: the wait set after it failed

    def tried_three_times() -> bool:
        dispatcher.run_once()
        observed = store.utcnow()
        with db.connect() as conn:
            row = conn.execute(select(NotificationDelivery)).one()
        if row.state == "pending" and row.attempts not in waits:
            waits[row.attempts] = (store.as_utc(row.next_attempt_at) - observed).total_seconds()
        return row.attempts >= 3

    wait_for(tried_three_times)
    webhook.up()  # the same port again
    drain(dispatcher, db)

    assert webhook.ids() == {event: 1}
    with db.connect() as conn:
        row = conn.execute(select(NotificationDelivery)).one()
    assert row.state == "delivered" and row.attempts >= 4
    # Backoff 0.1 s x 2^(try - 1), less up to a random quarter (and the time to observe it).
    for attempt in (1, 2, 3):
        full = 0.1 * 2 ** (attempt - 1)
        assert 0.75 * full - 0.1 <= waits[attempt] <= full, waits


def test_backoff_doubles_up_to_its_cap() -> None:
    rng = random.Random(7)
    waits = [store.backoff_seconds(n, 5.0, 60.0, rng) for n in range(1, 7)]
    for n, wait in enumerate(waits, start=1):
        full = min(60.0, 5.0 * 2 ** (n - 1))
        assert 0.75 * full <= wait <= full


def test_a_dead_letter_after_n_tries_is_delivered_when_an_admin_retries_it(
    db: Engine, webhook: WebhookReceiver, dispatcher: NotificationDispatcher
) -> None:
    add_webhook(db, webhook.url)
    webhook.status = 503
    (event,) = add_events(db, 1)

    wait_for(lambda: dispatcher.run_once() >= 0 and delivery_states(db) == {"dead": 1})
    assert len(webhook.received) == 4  # NOTIFICATION_MAX_ATTEMPTS
    factory = create_session_factory(db)
    with transaction(factory) as session:
        (dead,) = service.list_dead_letters(session, 10, 0).items
    assert (dead.event_id, dead.attempts, dead.last_error) == (event, 4, "HTTP 503")

    webhook.status = 200
    with transaction(factory) as session:
        retried = service.retry_dead_letter(session, dead.id)
    assert (retried.state, retried.attempts) == ("pending", 0)
    drain(dispatcher, db)

    assert delivery_states(db) == {"delivered": 1}
    assert webhook.ids(valid_only=True)[event] == 5


_CHILD = """
import time
from app.core.config import Settings
from app.core.db import create_db_engine
from app.notifications.dispatcher import NotificationDispatcher
settings = Settings()
NotificationDispatcher(create_db_engine(settings.database_url), settings).start()
print("started", flush=True)
time.sleep(600)
"""


def _child_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFICATION", "DATABASE"))}
    env["DATABASE_URL"] = settings.database_url
    env["AUTO_MIGRATE"] = "false"
    for name in (
        "notification_poll_interval_seconds",
        "notification_send_timeout_seconds",
        "notification_lease_seconds",
        "notification_concurrency",
        "notification_batch_size",
    ):
        env[name.upper()] = str(getattr(settings, name))
    return env


def test_a_dispatcher_killed_mid_delivery_loses_nothing_and_repeats_only_the_same_ids(
    db: Engine,
    webhook: WebhookReceiver,
    settings: Settings,
    dispatchers: list[NotificationDispatcher],
) -> None:
    add_webhook(db, webhook.url)
    ids = add_events(db, 20)
    settings = settings.model_copy(update={"notification_batch_size": 5})
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD],
        cwd=BACKEND,
        env=_child_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    killed = threading.Event()

    def kill_on_the_seventh(_item: Any) -> None:
        if len(webhook.received) == 7 and not killed.is_set():
            os.kill(child.pid, signal.SIGKILL)  # after the receiver has the request, unanswered
            killed.set()

    webhook.on_receive = kill_on_the_seventh
    try:
        wait_for(killed.is_set, timeout=60)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert set(webhook.ids()) < set(ids)

    webhook.on_receive = None
    restarted = NotificationDispatcher(db, settings)
    dispatchers.append(restarted)
    restarted.start()
    wait_for(lambda: delivery_states(db) == {"delivered": 20}, timeout=60)

    received = webhook.ids()
    assert set(received) == set(ids)  # every event delivered
    repeated = [i for i, n in received.items() if n > 1]
    bodies: dict[str, set[bytes]] = {}
    for item in webhook.received:
        if item.valid:
            bodies.setdefault(item.event_id, set()).add(item.body)
    # A repeat is the very same event: same id, same body; only the batch in flight repeats.
    assert all(len(b) == 1 for b in bodies.values())
    # A request the kill tore mid-body fails its signature (the receiver answers 401): it is a
    # prefix of the event's one body, never another body.
    for item in webhook.received:
        if not item.valid:
            (whole,) = bodies[item.event_id]
            assert len(item.body) < len(whole) and whole.startswith(item.body)
    assert len(repeated) <= 5


@pytest.fixture
def outage(database_url: str) -> Iterator[DatabaseOutage]:
    made: DatabaseOutage = (
        SqliteOutage(database_url)
        if database_url.startswith("sqlite")
        else PostgresOutage(database_url)
    )
    yield made
    made.close()


def test_a_database_outage_mid_delivery_only_delays_notifications(
    db: Engine,
    webhook: WebhookReceiver,
    outage: DatabaseOutage,
    database_url: str,
    tmp_path: Path,
) -> None:
    add_webhook(db, webhook.url)
    ids = add_events(db, 12)
    settings = notify_settings(
        outage.service_url, tmp_path, notification_batch_size=4, sqlite_busy_timeout_seconds=0.2
    )
    engine = create_db_engine(outage.service_url, sqlite_busy_timeout=0.2)
    first = threading.Event()

    def slow_first(_item: Any) -> None:
        first.set()
        time.sleep(0.3)  # the outage starts while this request is in flight

    webhook.on_receive = slow_first
    dispatcher = NotificationDispatcher(engine, settings)
    try:
        dispatcher.start()
        assert first.wait(20)
        outage.begin()
        time.sleep(1.5)
        stuck = delivery_states(db) if database_url.startswith("sqlite") else None
        outage.end()
        webhook.on_receive = None
        wait_for(lambda: delivery_states(db) == {"delivered": 12}, timeout=60)
    finally:
        dispatcher.stop(timeout=10)
        engine.dispose()

    assert stuck is None or stuck["delivered"] < 12
    received = webhook.ids()
    assert set(received) == set(ids)
    assert json.loads(webhook.received[0].body)["id"] in ids


def test_a_failure_never_stores_the_channels_secret(
    db: Engine, dispatcher: NotificationDispatcher
) -> None:
    """A Slack URL is a credential: an error page that echoes it is stored masked."""

    class Echo(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = f"no such hook: {self.path}".encode()
            self.send_response(404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    slack_url = f"http://127.0.0.1:{server.server_address[1]}/services/T0/B0/sekrit-token-42"
    try:
        with transaction(create_session_factory(db)) as session:
            channel = service.create_channel(
                session,
                ADMIN,
                ChannelCreate.model_validate(
                    {"name": "slack", "target": {"kind": "slack", "webhook_url": slack_url}}
                ),
            )
            service.create_subscription(
                session,
                ADMIN,
                SubscriptionCreate(channel_id=channel.id, event_kind="*", all_users=True),
            )
        add_events(db, 1)
        dispatcher.run_once()
    finally:
        server.shutdown()
        server.server_close()
    with db.connect() as conn:
        (row,) = conn.execute(select(NotificationDelivery))
    assert row.last_error == "HTTP 404 no such hook: ***"
