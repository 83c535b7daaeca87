"""``/api/v1/notifications`` over ASGI: administrators manage, users see only their own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import update

from app.access.principal import Principal
from app.api.auth import current_principal
from app.core.runtime import Runtime
from app.main import create_app
from app.models import NotificationDelivery
from app.notifications.dispatcher import NotificationDispatcher
from tests.notifications.conftest import (
    WebhookReceiver,
    add_events,
    delivery_states,
    drain,
    notify_settings,
)

API = "/api/v1/notifications"


@pytest.fixture
def runtime(database_url: str, tmp_path: Path) -> Iterator[Runtime]:
    settings = notify_settings(
        database_url,
        tmp_path,
        openai_api_key="sk-test-not-used",
        openai_base_url="http://127.0.0.1:9/v1",  # no LLM call is made here
    )
    built = Runtime.build(settings, start_background=False)
    yield built
    built.close()


@pytest.fixture
def app(runtime: Runtime) -> FastAPI:
    application = create_app(runtime.settings)
    application.state.runtime = runtime
    application.dependency_overrides[current_principal] = lambda: Principal("root", "admin")
    return application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://asa.test") as c:
        yield c


@pytest.fixture
def act_as(app: FastAPI) -> Callable[..., None]:
    def set_principal(user_id: str, role: str = "user") -> None:
        app.dependency_overrides[current_principal] = lambda: Principal(user_id, role)  # type: ignore[arg-type]

    return set_principal


async def make_channel(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    body = {"name": "team", "target": {"kind": "webhook", "url": "http://127.0.0.1:1/x"}}
    body.update(fields)
    response = await client.post(f"{API}/channels", json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def test_a_webhook_secret_is_shown_once_and_never_again(client: httpx.AsyncClient) -> None:
    created = await make_channel(client)
    secret = created["signing_secret"]
    assert secret.startswith("whsec_") and len(secret) > 40
    assert created["config"] == {"url": "http://127.0.0.1:1/x"} and created["has_secret"]

    listed = (await client.get(f"{API}/channels")).text
    one = (await client.get(f"{API}/channels/{created['id']}")).json()
    assert secret not in listed and "signing_secret" not in one and one["has_secret"]


async def test_slack_urls_and_smtp_passwords_are_never_returned(client: httpx.AsyncClient) -> None:
    slack_url = "https://hooks.slack.com/services/T000/B000/sekrit-token-123"
    slack = await make_channel(
        client, name="slack", target={"kind": "slack", "webhook_url": slack_url}
    )
    mail = await make_channel(
        client,
        name="mail",
        target={
            "kind": "email",
            "host": "smtp.example.org",
            "username": "asa",
            "password": "smtp-pass-987",
            "from_addr": "asa@example.org",
            "to": ["ops@example.org"],
        },
    )
    everything = (await client.get(f"{API}/channels")).text
    assert "sekrit-token-123" not in everything and "smtp-pass-987" not in everything
    assert slack["config"] == {"host": "hooks.slack.com"} and slack["signing_secret"] is None
    assert mail["config"]["username"] == "asa" and "password" not in mail["config"]


REFUSED_URLS = (
    "file:///etc/passwd",
    "ftp://example.org/x",
    "gopher://example.org",
    "javascript:alert(1)",
    "http://user:pw@example.org/",
    "http:///no-host",
    "http://exa mple.org/",
)


async def test_only_http_and_https_urls_are_accepted(client: httpx.AsyncClient) -> None:
    for url in REFUSED_URLS:
        webhook = await client.post(
            f"{API}/channels", json={"name": "bad", "target": {"kind": "webhook", "url": url}}
        )
        slack = await client.post(
            f"{API}/channels",
            json={"name": "bad", "target": {"kind": "slack", "webhook_url": url}},
        )
        assert (webhook.status_code, slack.status_code) == (422, 422), url
        assert url not in slack.text  # a Slack URL is a secret, even a refused one
    assert (await client.get(f"{API}/channels")).json()["items"] == []


async def test_channels_are_managed_by_administrators_only(
    client: httpx.AsyncClient, act_as: Callable[..., None]
) -> None:
    hidden = await make_channel(client, name="ops")
    shared = await make_channel(client, name="shared", user_selectable=True)
    act_as("alice")

    assert (await client.post(f"{API}/channels", json={"name": "x"})).status_code in (403, 422)
    ok = {"name": "mine", "target": {"kind": "webhook", "url": "https://example.org/"}}
    assert (await client.post(f"{API}/channels", json=ok)).status_code == 403
    listed = (await client.get(f"{API}/channels")).json()["items"]
    assert [c["name"] for c in listed] == ["shared"]
    assert listed[0]["config"] is None and listed[0]["created_by"] is None
    assert (await client.get(f"{API}/channels/{hidden['id']}")).status_code == 404
    assert (await client.delete(f"{API}/channels/{shared['id']}")).status_code == 403
    assert (await client.post(f"{API}/channels/{shared['id']}/test")).status_code == 403


async def test_a_user_cannot_see_or_manage_another_users_subscriptions(
    client: httpx.AsyncClient, act_as: Callable[..., None]
) -> None:
    shared = await make_channel(client, name="shared", user_selectable=True)
    act_as("alice")
    created = await client.post(
        f"{API}/subscriptions", json={"channel_id": shared["id"], "event_kind": "task.failed"}
    )
    assert created.status_code == 201 and created.json()["user_id"] == "alice"
    alices = created.json()["id"]

    act_as("bob")
    assert (await client.get(f"{API}/subscriptions/{alices}")).status_code == 404
    assert (await client.delete(f"{API}/subscriptions/{alices}")).status_code == 404
    nonexistent = await client.get(f"{API}/subscriptions/{'0' * 32}")
    assert nonexistent.status_code == 404
    assert (await client.get(f"{API}/subscriptions")).json()["items"] == []
    assert (await client.get(f"{API}/subscriptions?user_id=alice")).json()["items"] == []
    for body in (
        {"channel_id": shared["id"], "event_kind": "*", "user_id": "alice"},
        {"channel_id": shared["id"], "event_kind": "*", "all_users": True},
    ):
        assert (await client.post(f"{API}/subscriptions", json=body)).status_code == 403

    act_as("alice")
    mine = (await client.get(f"{API}/subscriptions")).json()["items"]
    assert [s["id"] for s in mine] == [alices]
    assert (await client.delete(f"{API}/subscriptions/{alices}")).status_code == 204


async def test_a_user_cannot_subscribe_to_a_channel_not_open_to_users(
    client: httpx.AsyncClient, act_as: Callable[..., None]
) -> None:
    ops = await make_channel(client, name="ops")
    act_as("alice")
    response = await client.post(
        f"{API}/subscriptions", json={"channel_id": ops["id"], "event_kind": "*"}
    )
    assert response.status_code == 404


async def test_duplicates_conflict(client: httpx.AsyncClient) -> None:
    channel = await make_channel(client)
    again = await client.post(
        f"{API}/channels",
        json={"name": "team", "target": {"kind": "webhook", "url": "https://example.org/"}},
    )
    assert again.status_code == 409
    body = {"channel_id": channel["id"], "event_kind": "*", "all_users": True}
    assert (await client.post(f"{API}/subscriptions", json=body)).status_code == 201
    assert (await client.post(f"{API}/subscriptions", json=body)).status_code == 409


async def test_send_a_test_reports_what_the_receiver_said(
    client: httpx.AsyncClient, webhook: WebhookReceiver
) -> None:
    channel = await make_channel(
        client,
        target={"kind": "webhook", "url": webhook.url, "signing_secret": webhook.secret},
    )
    result = (await client.post(f"{API}/channels/{channel['id']}/test")).json()
    assert result["delivered"] is True and result["error"] is None
    assert webhook.ids() == {result["event_id"]: 1}
    assert webhook.bodies()[0]["kind"] == "test"

    webhook.status = 500
    failed = (await client.post(f"{API}/channels/{channel['id']}/test")).json()
    assert failed["delivered"] is False and failed["error"].startswith("HTTP 500")


async def test_dead_letters_are_listed_and_retried_by_an_administrator(
    client: httpx.AsyncClient,
    runtime: Runtime,
    webhook: WebhookReceiver,
    act_as: Callable[..., None],
) -> None:
    channel = await make_channel(
        client,
        target={"kind": "webhook", "url": webhook.url, "signing_secret": webhook.secret},
    )
    subscribe = {"channel_id": channel["id"], "event_kind": "*", "all_users": True}
    assert (await client.post(f"{API}/subscriptions", json=subscribe)).status_code == 201
    (event,) = add_events(runtime.engine, 1)
    dispatcher = NotificationDispatcher(runtime.engine, runtime.settings)
    try:
        dispatcher.run_once()  # fan-out and the first (successful) try
        assert delivery_states(runtime.engine) == {"delivered": 1}
        with runtime.engine.begin() as conn:  # as if every try had failed
            conn.execute(
                update(NotificationDelivery).values(state="dead", attempts=4, last_error="HTTP 503")
            )

        (dead,) = (await client.get(f"{API}/dead-letters")).json()["items"]
        assert (dead["event_id"], dead["channel_name"], dead["attempts"]) == (event, "team", 4)
        act_as("alice")
        assert (await client.get(f"{API}/dead-letters")).status_code == 403
        assert (await client.post(f"{API}/dead-letters/{dead['id']}/retry")).status_code == 403
        act_as("root", "admin")
        retried = await client.post(f"{API}/dead-letters/{dead['id']}/retry")
        assert retried.status_code == 200 and retried.json()["state"] == "pending"
        again = await client.post(f"{API}/dead-letters/{dead['id']}/retry")
        assert again.status_code == 404
        drain(dispatcher, runtime.engine)
    finally:
        dispatcher.stop(timeout=10)

    assert webhook.ids() == {event: 2}
    assert (await client.get(f"{API}/dead-letters")).json()["items"] == []
