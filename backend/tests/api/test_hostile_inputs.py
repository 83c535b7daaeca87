"""What a hostile user sends, over HTTP, on SQLite and PostgreSQL: text a database cannot store,
local repository hosts, a flood of tasks, another user's task ids; and what the log may hold.

Also the open-mode guard against the socket actually bound (in-process, and a live
``uvicorn --host 0.0.0.0`` started directly, as the red-team report did).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import routing
from fastapi.routing import APIRoute
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import Session

from app.access.principal import Principal
from app.api.auth import InsecureStartupError
from app.main import create_app
from app.schemas.tasks import TaskSubmitRequest
from app.tasks import store as task_store
from app.tracking.record import UsageRecord

StartService = Any  # tests/api/conftest.py: start_service(**settings) -> Service
Service = Any
BACKEND_DIR = Path(__file__).resolve().parents[2]
CANARY = "hostile-canary-5f1c"
SUBMISSION = {
    "repo_url": "https://example.org/acme/widgets.git",
    "bug_description": "the widget count is off by one",
    "test_command": "pytest -q",
}


async def keyed(start_service: StartService, **settings: Any) -> tuple[Service, dict[str, str]]:
    service = await start_service(**settings)
    keys = {user: service.issue(user, role)[1] for user, role in ROLES.items()}
    return service, keys


ROLES: dict[str, Any] = {"root": "admin", "alice": "user", "bob": "user"}


def logged_text(caplog: pytest.LogCaptureFixture) -> str:
    """Every captured record, message, arguments and traceback."""
    parts = []
    for record in caplog.records:
        parts.append(record.getMessage())
        parts.append(repr(record.args))
        if record.exc_info and record.exc_info[1] is not None:
            parts.append(logging.Formatter().formatException(record.exc_info))
        if record.exc_text:
            parts.append(record.exc_text)
    return "\n".join(parts)


# -- text a database cannot store ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("bug_description", f"it breaks\x00{CANARY}"),
        ("test_command", f"pytest -k \x00{CANARY}"),
        ("repo_url", f"https://example.org/\x00{CANARY}.git"),
        ("ref", f"main\x00{CANARY}"),
        ("model", f"gpt-4o\x00{CANARY}"),
    ],
)
async def test_nul_in_any_task_field_is_a_422_and_never_logged(
    start_service: StartService, caplog: pytest.LogCaptureFixture, field: str, value: str
) -> None:
    service, keys = await keyed(start_service)
    client = service.client(keys["bob"])

    with caplog.at_level(logging.DEBUG):
        response = await client.post("/api/v1/task/submit", json={**SUBMISSION, field: value})

    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", field]
    assert CANARY not in response.text
    assert CANARY not in logged_text(caplog)
    assert (await client.get("/api/v1/task")).json()["total"] == 0


async def test_nul_in_a_key_name_is_a_422(start_service: StartService) -> None:
    service, keys = await keyed(start_service)

    response = await service.client(keys["root"]).post(
        "/api/v1/admin/keys", json={"user_id": "carol", "name": f"laptop\x00{CANARY}"}
    )

    assert response.status_code == 422
    assert CANARY not in response.text


def test_a_database_error_never_carries_the_statements_parameters(postgresql_url: str) -> None:
    from app.core.db import create_db_engine

    engine = create_db_engine(postgresql_url)
    # Past the API's validation (model_construct): the INSERT itself fails on PostgreSQL.
    request = TaskSubmitRequest.model_construct(
        repo_url="https://example.org/x.git",
        bug_description=f"nul\x00{CANARY}",
        test_command="pytest",
        model=None,
        max_cost_usd=None,
        max_attempts=3,
        ref=None,
    )
    try:
        with Session(engine) as session, session.begin():
            with pytest.raises(StatementError) as failed:
                task_store.create_task(session, Principal("bob", "user"), request, "gpt-4o-mini")
            session.rollback()
    finally:
        engine.dispose()

    text = str(failed.value)
    assert CANARY not in text and "INSERT INTO tasks" in text
    assert "parameters hidden" in text


async def test_an_unexpected_error_is_logged_without_its_message(
    start_service: StartService, caplog: pytest.LogCaptureFixture
) -> None:
    service = await start_service()

    def explode() -> None:
        raise ValueError(f"a message quoting the caller: {CANARY}")

    service.app.add_api_route("/explode", explode)
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=service.app, raise_app_exceptions=True),
        base_url="http://asa.test",
    )
    with caplog.at_level(logging.DEBUG):
        async with client:
            response = await client.get("/explode")  # the exception does not escape the app

    assert response.status_code == 500
    assert CANARY not in response.text
    assert CANARY not in logged_text(caplog)
    assert "builtins.ValueError" in caplog.text and "in explode" in caplog.text


# -- repository hosts ---------------------------------------------------------------------------

LOCAL_REPO_URLS = [
    "https://127.0.0.1:5432/x",
    "https://127.0.0.1:9/x",
    "https://localhost/x.git",
    "https://0x7f.1/x.git",
    "https://2130706433/x.git",
    "https://[::1]/x.git",
    "https://[::ffff:127.0.0.1]/x.git",
    "https://10.0.0.1/x.git",
    "https://169.254.169.254/latest/meta-data",
]


async def test_a_user_may_not_submit_a_local_or_private_repository_host(
    start_service: StartService,
) -> None:
    service, keys = await keyed(start_service)
    bob = service.client(keys["bob"])

    for url in LOCAL_REPO_URLS:
        response = await bob.post("/api/v1/task/submit", json={**SUBMISSION, "repo_url": url})
        assert response.status_code == 422, (url, response.text)
        assert response.json()["field"] == "repo_url"
    assert (await bob.get("/api/v1/task")).json()["total"] == 0


async def test_an_administrator_may_submit_a_local_repository_host(
    start_service: StartService,
) -> None:
    service, keys = await keyed(start_service)
    root = service.client(keys["root"])

    for url in LOCAL_REPO_URLS:
        response = await root.post("/api/v1/task/submit", json={**SUBMISSION, "repo_url": url})
        assert response.status_code == 202, (url, response.text)


# -- the queue ----------------------------------------------------------------------------------


async def test_a_submission_beyond_the_users_queued_cap_is_a_429(
    start_service: StartService,
) -> None:
    service, keys = await keyed(start_service, task_max_queued_per_user=3)
    bob, alice = service.client(keys["bob"]), service.client(keys["alice"])

    answers = [(await bob.post("/api/v1/task/submit", json=SUBMISSION)) for _ in range(4)]

    assert [a.status_code for a in answers] == [202, 202, 202, 429]
    refused = answers[-1].json()
    assert refused["error"] == "queue_full" and refused["limit"] == 3
    assert "3 tasks waiting" in refused["detail"]
    assert (await bob.get("/api/v1/task")).json()["total"] == 3
    assert (await alice.post("/api/v1/task/submit", json=SUBMISSION)).status_code == 202


# -- another user's task is a task that does not exist -------------------------------------------

BODIES = {"PUT": {"limit_usd": "1"}, "POST": {}, "PATCH": {}}


def task_operations() -> list[tuple[str, str]]:
    """(method, path) of every API route of the application with a ``{task_id}`` parameter (the
    web console's pages sign in with a cookie, not a bearer key)."""
    app = create_app()
    routes: list[Any] = list(app.routes)
    if hasattr(routing, "iter_route_contexts"):  # FastAPI >= 0.165 includes routers lazily
        routes = list(routing.iter_route_contexts(app.routes))
    return sorted(
        (method, route.path)
        for route in routes
        if isinstance(getattr(route, "original_route", route), APIRoute)
        and route.path.startswith("/api/")
        and "{task_id}" in route.path
        for method in route.methods
    )


TASK_OPERATIONS = task_operations()


def test_the_task_routes_are_all_found() -> None:
    found = set(TASK_OPERATIONS)
    for expected in [
        ("GET", "/api/v1/task/{task_id}"),
        ("POST", "/api/v1/task/{task_id}/cancel"),
        ("GET", "/api/v1/task/{task_id}/events"),
        ("GET", "/api/v1/usage/task/{task_id}"),
        ("GET", "/api/v1/limits/tasks/{task_id}"),
    ]:
        assert expected in found


async def test_another_users_task_answers_on_every_route_exactly_as_a_missing_one(
    start_service: StartService,
) -> None:
    service, keys = await keyed(start_service)
    bob, alice = service.client(keys["bob"]), service.client(keys["alice"])
    submitted = await bob.post("/api/v1/task/submit", json=SUBMISSION)
    bobs = submitted.json()["task_id"]
    service.runtime.writer.write(  # bob's task has usage too
        UsageRecord(
            request_id="r-bob", task_id=bobs, user_id="bob", model="gpt-4o-mini",
            status="success", prompt_tokens=10, completion_tokens=2, cost_pico_usd=7_000,
        )
    )  # fmt: skip
    missing = "tsk_" + secrets.token_hex(14)
    paths = [(method, path.replace("{task_id}", "{}")) for method, path in TASK_OPERATIONS] + [
        ("GET", "/api/v1/usage/export?task_id={}")
    ]

    for method, path in paths:
        body = {"json": BODIES[method]} if method in BODIES else {}
        others = await alice.request(method, path.format(bobs), **body)
        absent = await alice.request(method, path.format(missing), **body)
        assert others.status_code == absent.status_code, (method, path, others.text)
        assert others.status_code in (403, 404), (method, path, others.text)
        assert others.text.replace(bobs, "<id>") == absent.text.replace(missing, "<id>"), path
        assert "bob" not in others.text.replace(bobs, "<id>")
    # ...and bob still sees it.
    assert (await bob.get(f"/api/v1/usage/task/{bobs}")).status_code == 200
    assert (await bob.get(f"/api/v1/task/{bobs}")).status_code == 200


# -- the open-mode guard checks the address actually bound ---------------------------------------


async def test_open_mode_refuses_to_start_when_the_process_already_listens_off_loopback(
    start_service: StartService,
) -> None:
    with socket.socket() as exposed:
        exposed.bind(("0.0.0.0", 0))
        exposed.listen(1)
        with pytest.raises(InsecureStartupError, match=r"listens on 0\.0\.0\.0"):
            await start_service()  # BIND_HOST says 127.0.0.1; the socket says otherwise


async def test_open_mode_stops_serving_once_the_process_listens_off_loopback(
    start_service: StartService, caplog: pytest.LogCaptureFixture
) -> None:
    service = await start_service()
    client = service.client()
    assert (await client.get("/api/v1/task")).status_code == 200

    with socket.socket(socket.AF_INET6) as exposed, caplog.at_level(logging.ERROR):
        exposed.bind(("::", 0))  # every interface, IPv6 and IPv4
        exposed.listen(1)
        time.sleep(1.1)  # past the guard's one-second cache
        refused = await client.get("/api/v1/task")
        health = await client.get("/health")

    assert refused.status_code == 401
    assert "Open local mode is off" in refused.json()["detail"]
    assert health.json()["auth_mode"] == "keys"
    assert "open local mode is OFF" in caplog.text


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_uvicorn_started_directly_on_every_interface_does_not_serve_open_mode(
    tmp_path: Path,
) -> None:
    port = _free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'asa.db'}",
        "SPOOL_DIR": str(tmp_path / "spool"),
        "EXAMPLES_DIR": str(tmp_path / "examples"),
        "RUN_TASK_WORKER": "false",
    }  # no BIND_HOST: exactly `uvicorn app.main:app --host 0.0.0.0`
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [
                *(sys.executable, "-m", "uvicorn", "app.main:app"),
                *("--host", "0.0.0.0", "--port", str(port)),
            ],
            cwd=BACKEND_DIR,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base}/health", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(log.read_text()[-3000:]) from None
                time.sleep(0.2)

        response = httpx.get(f"{base}/api/v1/task", timeout=10)
        health = httpx.get(f"{base}/health", timeout=10).json()
    finally:
        server.terminate()
        server.wait(timeout=30)

    assert response.status_code == 401, response.text
    assert health["auth_mode"] == "keys"
    assert re.search(
        r"open local mode is OFF - this process listens on 0\.0\.0\.0", log.read_text()
    )
