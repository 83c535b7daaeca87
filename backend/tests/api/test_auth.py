"""Access control on every endpoint, over HTTP (ASGI), on SQLite and PostgreSQL.

The routes are enumerated from the application itself, so an endpoint added later is checked
by these tests without touching them: every route outside ``PUBLIC_PATHS`` must refuse an
anonymous, wrong or revoked key with 401, and every route that depends on ``require_admin``
must refuse a user's key with 403.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest
from fastapi import routing
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from app.api.auth import InsecureStartupError, current_principal, require_admin
from app.main import create_app
from app.tracking.record import UsageRecord
from app.web.render import ConsoleRoute

StartService = Any  # tests/api/conftest.py: start_service(**settings) -> Service
Service = Any
PUBLIC_PATHS = {"/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
# The gateway's catch-all answers 404 ``unknown_url`` in the OpenAI shape: nothing is served there.
GATEWAY_PREFIX, GATEWAY_CATCH_ALL = "/v1/", "/v1/{path:path}"
PATH_SAMPLES = {"period": "daily", "key_id": "0123456789abcdef0123456789abcdef"}
WITH_BODY = {"POST", "PUT", "PATCH"}


def _walk(dependant: Dependant) -> list[Any]:
    calls = [dependant.call]
    for sub in dependant.dependencies:
        calls.extend(_walk(sub))
    return calls


def api_operations() -> list[tuple[str, Any]]:
    """(method, route) of every API route of the application, included routers flattened."""
    app = create_app()
    routes: list[Any] = list(app.routes)
    if hasattr(routing, "iter_route_contexts"):  # FastAPI >= 0.165 includes routers lazily
        routes = list(routing.iter_route_contexts(app.routes))
    return [
        (method, route)
        for route in routes
        if isinstance(getattr(route, "original_route", route), APIRoute)
        # The web console signs in with a session cookie (its access: tests/web).
        and not isinstance(getattr(route, "original_route", route), ConsoleRoute)
        and route.path not in PUBLIC_PATHS
        and route.path != GATEWAY_CATCH_ALL
        for method in sorted(route.methods)
    ]


OPERATIONS = api_operations()
ADMIN_OPERATIONS = [(m, r) for m, r in OPERATIONS if require_admin in _walk(r.dependant)]


def concrete(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: PATH_SAMPLES.get(m.group(1), "x1"), path)


async def call(client: httpx.AsyncClient, method: str, route: Any) -> httpx.Response:
    body: dict[str, Any] = {"json": {}} if method in WITH_BODY else {}
    return await client.request(method, concrete(route.path), **body)


def assert_leaks_nothing(response: httpx.Response, *secrets: str) -> None:
    text = response.text + " ".join(f"{k}: {v}" for k, v in response.headers.items())
    for secret in secrets:
        assert secret not in text, (response.request.url, secret)


async def keyed_service(start_service: StartService) -> tuple[Service, dict[str, str]]:
    service = await start_service()
    _, admin = service.issue("root", "admin")
    _, alice = service.issue("alice")
    _, bob = service.issue("bob")
    return service, {"admin": admin, "alice": alice, "bob": bob}


def test_every_api_route_requires_a_principal() -> None:
    assert len(OPERATIONS) >= 20
    for method, route in OPERATIONS:
        if route.path.startswith(GATEWAY_PREFIX):
            continue  # the gateway authenticates in its handler (OpenAI-shaped errors): below
        assert current_principal in _walk(route.dependant), (method, route.path)
    gateway = {route.path for _, route in OPERATIONS if route.path.startswith(GATEWAY_PREFIX)}
    assert {"/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v1/models"} <= gateway


def assert_unauthorized(response: httpx.Response, path: str, case: str = "") -> None:
    """401 with a Bearer challenge, in the API's shape or, on the gateway, in OpenAI's."""
    assert response.status_code == 401, (case, response.request.method, path, response.text)
    assert response.headers["www-authenticate"] == "Bearer"
    if path.startswith(GATEWAY_PREFIX):
        assert response.json()["error"]["code"] == "invalid_api_key"
    else:
        assert response.json()["error"] == "unauthorized"


def test_admin_only_routes_include_the_documented_ones() -> None:
    admin = {(m, r.path) for m, r in ADMIN_OPERATIONS}
    for expected in [
        ("GET", "/api/v1/usage/overall"),
        ("GET", "/api/v1/usage/metrics/tasks"),
        ("GET", "/api/v1/limits/global"),
        ("PUT", "/api/v1/limits/users/{user_id}/{period}"),
        ("GET", "/api/v1/limits/overrides"),
        ("POST", "/api/v1/admin/keys"),
        ("GET", "/api/v1/admin/keys"),
        ("DELETE", "/api/v1/admin/keys/{key_id}"),
    ]:
        assert expected in admin
    # Every limits and key-management route is admin-only, except a user reading their own.
    for method, route in OPERATIONS:
        if route.path.startswith(("/api/v1/limits", "/api/v1/admin")):
            own = (method, route.path) == ("GET", "/api/v1/limits/users/{user_id}")
            assert ((method, route) in ADMIN_OPERATIONS) != own, (method, route.path)


async def test_anonymous_requests_get_401_on_every_api_route(start_service: StartService) -> None:
    service, _ = await keyed_service(start_service)
    client = service.client()
    for method, route in OPERATIONS:
        assert_unauthorized(await call(client, method, route), route.path)


async def test_wrong_keys_get_401_and_are_not_echoed(start_service: StartService) -> None:
    service, keys = await keyed_service(start_service)
    real = keys["alice"]
    forged = real[:-6] + ("AAAAAA" if not real.endswith("AAAAAA") else "BBBBBB")
    unknown = "asa_0123456789ab_" + "x" * 43
    cases = {
        "forged secret": {"Authorization": f"Bearer {forged}"},
        "unknown key": {"Authorization": f"Bearer {unknown}"},
        "garbage": {"Authorization": "Bearer not-a-key"},
        "basic scheme": {"Authorization": f"Basic {real}"},
        "no credentials": {"Authorization": "Bearer"},
    }
    for name, headers in cases.items():
        client = service.client(**headers)
        for method, route in OPERATIONS:
            response = await call(client, method, route)
            assert_unauthorized(response, route.path, name)
            assert_leaks_nothing(response, forged, unknown, real)


async def test_revoked_key_gets_401_on_every_api_route(start_service: StartService) -> None:
    service = await start_service()
    service.issue("root", "admin")
    key_id, key = service.issue("carol", "admin")
    client = service.client(key)
    assert (await client.get("/api/v1/admin/keys")).status_code == 200

    service.revoke(key_id)

    for method, route in OPERATIONS:
        response = await call(client, method, route)
        assert_unauthorized(response, route.path)
        assert_leaks_nothing(response, key)


async def test_user_key_on_admin_routes_gets_403(start_service: StartService) -> None:
    service, keys = await keyed_service(start_service)
    client = service.client(keys["alice"])
    for method, route in ADMIN_OPERATIONS:
        response = await call(client, method, route)
        assert response.status_code == 403, (method, route.path, response.text)
        assert response.json()["error"] == "forbidden"
        assert_leaks_nothing(response, keys["alice"], keys["admin"])


async def test_admin_key_passes_authentication_on_every_api_route(
    start_service: StartService,
) -> None:
    service, keys = await keyed_service(start_service)
    client = service.client(keys["admin"])
    for method, route in OPERATIONS:
        response = await call(client, method, route)
        assert response.status_code not in (401, 403, 500), (method, route.path, response.text)


# -- isolation ----------------------------------------------------------------------------------

SUBMISSION = {
    "repo_url": "https://example.org/acme/widgets.git",
    "bug_description": "bob's secret bug: the widget count is off by one",
    "test_command": "pytest -q",
}


async def test_a_user_cannot_see_or_cancel_another_users_task(
    start_service: StartService,
) -> None:
    service, keys = await keyed_service(start_service)
    bob, alice = service.client(keys["bob"]), service.client(keys["alice"])
    submitted = await bob.post("/api/v1/task/submit", json=SUBMISSION)
    assert submitted.status_code == 202, submitted.text
    task_id = submitted.json()["task_id"]

    for response in [
        await alice.get(f"/api/v1/task/{task_id}"),
        await alice.post(f"/api/v1/task/{task_id}/cancel"),
        await alice.get(f"/api/v1/task/{task_id}/events"),
    ]:
        assert response.status_code == 404, response.text
        assert_leaks_nothing(response, SUBMISSION["bug_description"], "bob")
    listed = await alice.get("/api/v1/task")
    assert listed.json()["items"] == [] and listed.json()["total"] == 0

    mine = await bob.get(f"/api/v1/task/{task_id}")
    assert mine.status_code == 200 and mine.json()["status"] == "queued"
    seen_by_admin = await service.client(keys["admin"]).get(f"/api/v1/task/{task_id}")
    assert seen_by_admin.status_code == 200


async def test_a_task_belongs_to_the_user_of_the_key_that_submitted_it(
    start_service: StartService,
) -> None:
    service, keys = await keyed_service(start_service)
    submitted = await service.client(keys["bob"]).post("/api/v1/task/submit", json=SUBMISSION)
    task_id = submitted.json()["task_id"]

    from app.models import Task

    with service.runtime.session_factory() as session:
        task = session.get(Task, task_id)
        assert task is not None and task.user_id == "bob"
    assert re.fullmatch(r"tsk_[0-9a-f]{28}", task_id)  # 112 random bits: not guessable


async def test_a_user_reads_only_their_own_usage(start_service: StartService) -> None:
    service, keys = await keyed_service(start_service)
    service.runtime.writer.write(
        UsageRecord(
            request_id="r-bob", task_id="t-bob", user_id="bob", model="gpt-4o-mini",
            status="success", prompt_tokens=10, completion_tokens=2, cost_pico_usd=7_000,
        ),
    )  # fmt: skip
    alice, bob = service.client(keys["alice"]), service.client(keys["bob"])

    for path in [
        "/api/v1/usage/user/bob",
        "/api/v1/usage/export?user_id=bob",
        "/api/v1/usage/export",
        "/api/v1/limits/users/bob",
    ]:
        response = await alice.get(path)
        assert response.status_code == 403, (path, response.text)
        assert_leaks_nothing(response, "t-bob", "0.000000007")
    # Another user's task is answered exactly as a task that does not exist.
    for path in ["/api/v1/usage/task/{}", "/api/v1/usage/export?task_id={}"]:
        response = await alice.get(path.format("t-bob"))
        absent = await alice.get(path.format("t-none"))
        assert response.status_code == absent.status_code == 404, (path, response.text)
        assert response.text.replace("t-bob", "?") == absent.text.replace("t-none", "?")
        assert_leaks_nothing(response, "0.000000007")
        assert "bob" not in response.text.replace("t-bob", "?")
    assert (await bob.get("/api/v1/usage/user/bob")).json()["totals"]["requests"] == 1
    assert (await bob.get("/api/v1/usage/task/t-bob")).status_code == 200
    assert (await alice.get("/api/v1/usage/user/alice")).status_code == 200


# -- modes --------------------------------------------------------------------------------------


async def test_open_mode_serves_local_requests_as_the_local_admin(
    start_service: StartService, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="app.api.auth"):
        service = await start_service()
    assert "OPEN LOCAL MODE" in caplog.text
    client = service.client()

    health = await client.get("/health")
    assert health.json()["auth_mode"] == "open"
    assert (await client.get("/api/v1/admin/keys")).status_code == 200
    submitted = await client.post("/api/v1/task/submit", json=SUBMISSION)
    assert submitted.status_code == 202


async def test_open_mode_refuses_requests_from_other_machines_and_through_proxies(
    start_service: StartService,
) -> None:
    service = await start_service()
    remote = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=service.app, client=("203.0.113.7", 40000)),
        base_url="http://asa.test",
    )
    service.clients.append(remote)
    proxied = service.client(**{"X-Forwarded-For": "203.0.113.7"})

    for client in (remote, proxied):
        response = await client.get("/api/v1/task")
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == "Bearer"


async def test_the_first_key_ends_open_mode(start_service: StartService) -> None:
    service = await start_service()
    client = service.client()
    created = await client.post("/api/v1/admin/keys", json={"user_id": "root", "role": "admin"})
    assert created.status_code == 201, created.text
    key = created.json()["key"]

    assert (await client.get("/api/v1/task")).status_code == 401
    assert (await client.get("/health")).json()["auth_mode"] == "keys"
    assert (await service.client(key).get("/api/v1/task")).status_code == 200


async def test_revoking_every_key_does_not_reopen_the_service(start_service: StartService) -> None:
    service = await start_service()
    key_id, _ = service.issue("root", "admin")
    service.revoke(key_id)
    await asyncio.sleep(1.1)  # past every cache

    assert (await service.client().get("/api/v1/task")).status_code == 401
    assert (await service.client().get("/health")).json()["auth_mode"] == "keys"


async def test_service_bound_off_loopback_without_keys_refuses_to_start(
    start_service: StartService,
) -> None:
    with pytest.raises(InsecureStartupError, match="no API key exists"):
        await start_service(bind_host="0.0.0.0")


async def test_service_bound_off_loopback_with_a_key_starts_in_keys_mode(
    start_service: StartService,
) -> None:
    first = await start_service()
    first.issue("root", "admin")

    service = await start_service(bind_host="0.0.0.0")

    assert (await service.client().get("/health")).json()["auth_mode"] == "keys"
    assert (await service.client().get("/api/v1/task")).status_code == 401


async def test_key_changes_made_elsewhere_take_effect_within_a_second(
    start_service: StartService,
) -> None:
    service = await start_service()
    anonymous = service.client()
    assert (await anonymous.get("/api/v1/task")).status_code == 200  # open mode

    from app.access import api_keys
    from app.core.db import transaction

    with transaction(service.runtime.session_factory) as session:  # as `asa keys create` does
        issued = api_keys.create_key(session, user_id="root", role="admin")
    await asyncio.sleep(1.1)
    assert (await anonymous.get("/api/v1/task")).status_code == 401

    keyed = service.client(issued.key)
    assert (await keyed.get("/api/v1/task")).status_code == 200
    service.revoke(issued.row.id, elsewhere=True)  # as `asa keys revoke` does
    await asyncio.sleep(1.1)
    assert (await keyed.get("/api/v1/task")).status_code == 401


# -- the admin keys API -------------------------------------------------------------------------


async def test_admin_api_issues_lists_and_revokes_keys(start_service: StartService) -> None:
    service, keys = await keyed_service(start_service)
    admin = service.client(keys["admin"])

    created = await admin.post(
        "/api/v1/admin/keys", json={"user_id": "dave", "role": "user", "name": "ci runner"}
    )
    assert created.status_code == 201, created.text
    body = created.json()
    dave = body["key"]
    assert dave.startswith(f"asa_{body['prefix']}_") and body["user_id"] == "dave"
    assert (await service.client(dave).get("/api/v1/usage/user/dave")).status_code == 200

    listed = await admin.get("/api/v1/admin/keys")
    assert listed.status_code == 200
    rows = {row["id"]: row for row in listed.json()["items"]}
    assert rows[body["id"]]["name"] == "ci runner"
    assert rows[body["id"]]["last_used_at"] is not None
    assert_leaks_nothing(listed, dave, *keys.values())

    revoked = await admin.delete(f"/api/v1/admin/keys/{body['id']}")
    assert revoked.status_code == 204
    assert (await service.client(dave).get("/api/v1/usage/user/dave")).status_code == 401
    again = await admin.get("/api/v1/admin/keys")
    assert {r["id"]: r for r in again.json()["items"]}[body["id"]]["revoked_at"] is not None
    assert (await admin.delete("/api/v1/admin/keys/" + "f" * 32)).status_code == 404


async def test_admin_api_validates_new_keys(start_service: StartService) -> None:
    service, keys = await keyed_service(start_service)
    admin = service.client(keys["admin"])
    for body in [
        {"user_id": ""},
        {"user_id": "-alice"},
        {"user_id": "a" * 65},
        {"user_id": "alice", "role": "root"},
        {"user_id": "alice", "name": "x\n"},
        {"user_id": "alice", "extra": 1},
    ]:
        response = await admin.post("/api/v1/admin/keys", json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["error"] == "invalid_input"


async def test_only_admins_may_submit_a_local_repository_path(
    start_service: StartService, tmp_path: Any
) -> None:
    import subprocess

    repo = tmp_path / "local-repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    service, keys = await keyed_service(start_service)
    body = {"repo_url": str(repo), "bug_description": "bug", "test_command": "pytest"}

    as_user = await service.client(keys["alice"]).post("/api/v1/task/submit", json=body)
    as_admin = await service.client(keys["admin"]).post("/api/v1/task/submit", json=body)

    assert as_user.status_code == 422 and as_user.json()["field"] == "repo_url"
    assert as_admin.status_code == 202
