"""Who may use the console and what they see: sign-in, the session cookie, CSRF, revocation,
open local mode, and a second user who sees nothing of the first's (pages and fragments)."""

from __future__ import annotations

from http.cookies import SimpleCookie

import pytest

from app.tracking.llm_client import LLMClient
from tests.web.conftest import Console, StartConsole, queue_task


def make_calls(console: Console, task_id: str, user_id: str, agents: list[str]) -> None:
    for agent in agents:
        LLMClient(
            task_id=task_id, user_id=user_id, agent=agent, runtime=console.runtime
        ).chat_completion(messages=[{"role": "user", "content": "Fix it."}], model="gpt-4o-mini")


async def test_pages_send_a_visitor_without_a_session_to_sign_in(
    start_console: StartConsole,
) -> None:
    console = await start_console()
    console.issue("alice", "admin")
    browser = console.browser()

    for path in ("/", "/tasks", "/tasks/new", "/usage", "/budgets", "/keys"):
        response = await browser.get(path)
        assert response.status_code == 303, path
        assert response.headers["location"].startswith("/login?next=")
    fragment = await browser.get("/tasks/rows", headers={"HX-Request": "true"})
    assert fragment.status_code == 401
    assert fragment.headers["HX-Redirect"].startswith("/login")


async def test_sign_in_sets_an_httponly_samesite_cookie_that_holds_no_key(
    start_console: StartConsole,
) -> None:
    console = await start_console()
    _, key = console.issue("alice", "admin")
    browser = console.browser()

    response = await browser.sign_in(key)

    cookies = SimpleCookie()
    for header in response.headers.get_list("set-cookie"):
        cookies.load(header)
    session = cookies["asa_session"]
    assert session["httponly"] is True
    assert session["samesite"].lower() == "lax"
    assert int(session["max-age"]) == 12 * 3600
    secret_part = key.split("_", 2)[2]
    assert key not in session.value and secret_part not in session.value
    assert cookies["asa_csrf"]["httponly"] is True
    home = await browser.get("/")
    assert home.status_code == 200
    assert 'data-testid="user">alice<' in home.text


async def test_an_invalid_key_is_refused_with_the_sign_in_page(start_console: StartConsole) -> None:
    console = await start_console()
    console.issue("alice")
    browser = console.browser()

    response = await browser.post_form("/login", {"api_key": "asa_000000000000_" + "x" * 43})

    assert response.status_code == 401
    assert "not a valid API key" in response.text
    assert "asa_session" not in response.headers.get("set-cookie", "")


async def test_a_forged_session_cookie_is_not_a_session(start_console: StartConsole) -> None:
    console = await start_console()
    _, key = console.issue("alice", "admin")
    browser = console.browser()
    await browser.sign_in(key)
    payload, mac = browser.http.cookies["asa_session"].split(".")
    browser.http.cookies.set("asa_session", f"{payload}.{mac[:-2]}AA", domain="asa.test")

    response = await browser.get("/")

    assert response.status_code == 303


async def test_a_post_without_its_csrf_token_is_refused(start_console: StartConsole) -> None:
    console = await start_console()
    _, key = console.issue("alice", "admin")
    browser = console.browser()
    await browser.sign_in(key)
    form = {"user_id": "mallory", "role": "admin"}

    missing = await browser.http.post("/keys", data=form)
    wrong = await browser.http.post("/keys", data={**form, "csrf_token": "x" * 43})
    page = await browser.get("/keys")
    cross_site = await browser.http.post(
        "/keys",
        data={**form, "csrf_token": page.text.split('name="csrf_token" value="')[1].split('"')[0]},
        headers={"Origin": "https://evil.example"},
    )
    login_without_token = await console.browser().http.post("/login", data={"api_key": key})

    for refused in (missing, wrong, cross_site, login_without_token):
        assert refused.status_code == 403
    keys = await console.api(key).get("/api/v1/admin/keys")
    assert "mallory" not in {k["user_id"] for k in keys.json()["items"]}
    accepted = await browser.post_form("/keys", form)
    assert accepted.status_code == 200 and 'data-testid="new-key"' in accepted.text


async def test_a_token_from_before_sign_in_does_not_work_after_it(
    start_console: StartConsole,
) -> None:
    console = await start_console()
    _, key = console.issue("alice", "admin")
    browser = console.browser()
    old_token = (await browser.get("/login")).text.split('name="csrf_token" value="')[1][:43]
    await browser.sign_in(key)

    response = await browser.http.post(
        "/keys", data={"user_id": "mallory", "csrf_token": old_token}
    )

    assert response.status_code == 403


async def test_a_revoked_keys_session_ends_at_once(start_console: StartConsole) -> None:
    console = await start_console()
    console.issue("root", "admin")
    key_id, key = console.issue("bob")
    browser = console.browser()
    await browser.sign_in(key)
    assert (await browser.get("/tasks")).status_code == 200

    console.revoke_elsewhere(key_id)  # another process (the CLI): no cache here is told
    response = await browser.get("/tasks")

    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=%2Ftasks"
    assert 'asa_session=""' in response.headers["set-cookie"]
    assert (await browser.get("/")).status_code == 303


async def test_revoking_a_key_in_the_console_ends_its_sessions(
    start_console: StartConsole,
) -> None:
    console = await start_console()
    _, admin_key = console.issue("root", "admin")
    bob_id, bob_key = console.issue("bob")
    admin, bob = console.browser(), console.browser()
    await admin.sign_in(admin_key)
    await bob.sign_in(bob_key)

    response = await admin.post_form(f"/keys/{bob_id}/revoke", {}, token_from="/keys")

    assert response.status_code == 303
    assert (await bob.get("/")).status_code == 303
    assert (await console.api(bob_key).get("/api/v1/task")).status_code == 401


async def test_sign_out_ends_the_session(start_console: StartConsole) -> None:
    console = await start_console()
    _, key = console.issue("alice")
    browser = console.browser()
    await browser.sign_in(key)

    response = await browser.post_form("/logout", {}, token_from="/")

    assert response.status_code == 303 and response.headers["location"] == "/login"
    assert (await browser.get("/")).status_code == 303


async def test_open_local_mode_is_the_local_administrator_on_this_machine_only(
    start_console: StartConsole,
) -> None:
    console = await start_console()

    local = await console.browser().get("/keys")
    remote = await console.browser(client=("203.0.113.7", 40000)).get("/keys")
    forwarded = await console.browser().get("/keys", headers={"X-Forwarded-For": "203.0.113.7"})

    assert local.status_code == 200
    assert "Open local mode" in local.text and 'data-testid="user">local<' in local.text
    assert remote.status_code == 303
    assert forwarded.status_code == 303


async def test_the_first_key_created_in_open_mode_requires_sign_in_from_then_on(
    start_console: StartConsole,
) -> None:
    console = await start_console()
    browser = console.browser()

    created = await browser.post_form("/keys", {"user_id": "alice", "role": "admin"})

    assert created.status_code == 200 and 'data-testid="new-key"' in created.text
    assert (await browser.get("/")).status_code == 303


async def test_console_pages_forbid_other_origins_and_caching(start_console: StartConsole) -> None:
    console = await start_console()

    response = await console.browser().get("/")

    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-frame-options"] == "DENY"
    assert "http://" not in response.text.split("<body>")[0]  # every asset from this origin


async def test_a_user_sees_none_of_another_users_tasks_or_spend(
    start_console: StartConsole,
) -> None:
    console = await start_console()
    console.issue("root", "admin")
    _, alice_key = console.issue("alice")
    _, bob_key = console.issue("bob")
    alice_task = queue_task(console, "alice", "https://example.com/alice-secret.git")
    bob_task = queue_task(console, "bob", "https://example.com/bob-repo.git")
    make_calls(console, alice_task, "alice", ["FixAgent", "CodeAgent"])
    make_calls(console, bob_task, "bob", ["FixAgent"])
    bob = console.browser()
    await bob.sign_in(bob_key)

    pages = [
        await bob.get(path)
        for path in (
            "/",
            "/tasks",
            "/tasks/rows",
            "/tasks?user=alice",
            "/tasks/rows?user=alice&repo=alice",
            "/usage",
            "/usage?group_by=user",
            "/usage?group_by=model",
            "/usage/table.csv?group_by=user",
            "/usage/export.csv",
            "/budgets?user=alice",
        )
    ]
    for page in pages:
        assert page.status_code == 200, page.url
        assert alice_task not in page.text and "alice" not in page.text, page.url
    assert bob_task in pages[1].text
    for path in (
        f"/tasks/{alice_task}",
        f"/tasks/{alice_task}/live",
        f"/tasks/{alice_task}/events",
        f"/usage/export.csv?task={alice_task}",
    ):
        response = await bob.get(path, headers={"HX-Request": "true"})
        assert response.status_code == 404, path
        assert "alice" not in response.text
    assert (await bob.get("/usage?user=alice")).status_code == 403
    assert (await bob.get("/usage/export.csv?user=alice")).status_code == 403
    assert (await bob.get("/keys")).status_code == 403
    cancel = await bob.post_form(f"/tasks/{alice_task}/cancel", {}, token_from="/tasks")
    assert cancel.status_code == 404
    budget = await bob.post_form(
        "/budgets", {"scope": "user_daily", "subject_id": "bob", "limit_usd": "100"}
    )
    assert budget.status_code == 403
    alice = console.browser()
    await alice.sign_in(alice_key)
    assert alice_task in (await alice.get("/tasks")).text


@pytest.mark.parametrize("path", ["/tasks/bad%20id", "/tasks/" + "x" * 65])
async def test_a_malformed_task_id_is_an_error_page_not_a_crash(
    start_console: StartConsole, path: str
) -> None:
    console = await start_console()

    response = await console.browser().get(path)

    assert response.status_code in (404, 422)
    assert "text/html" in response.headers["content-type"]
