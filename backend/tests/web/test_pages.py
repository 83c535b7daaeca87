"""What the console's pages say: the same figures as the API, the forms' effects, the empty
states, paging and filters (SQLite and PostgreSQL)."""

from __future__ import annotations

import csv
import html
import io
import re
from decimal import Decimal

from opentelemetry.trace import Tracer

from app.tracking.llm_client import LLMClient
from tests.web.conftest import Console, StartConsole, queue_task


def call(
    console: Console,
    task_id: str | None,
    user_id: str,
    agent: str = "FixAgent",
    model: str = "gpt-4o-mini",
    tracer: Tracer | None = None,
) -> None:
    client = LLMClient(
        task_id=task_id, user_id=user_id, agent=agent, runtime=console.runtime, tracer=tracer
    )
    client.chat_completion(messages=[{"role": "user", "content": "Fix it."}], model=model)


def cell_texts(html: str, testid: str) -> list[str]:
    return re.findall(rf'data-testid="{testid}">([^<]+)<', html)


async def test_the_overview_shows_the_usage_apis_figures_and_flags_unpriced_calls(
    start_console: StartConsole,
) -> None:
    console = await start_console()
    _, key = console.issue("alice")
    task = queue_task(console, "alice")
    for agent in ("FixAgent", "CodeAgent", "TestGenerator"):
        call(console, task, "alice", agent)
    call(console, task, "alice", model="house-model-without-a-price")
    call(console, None, "carol")  # someone else's spend is not alice's
    browser = console.browser()
    await browser.sign_in(key)

    page = (await browser.get("/")).text
    api = (await console.api(key).get("/api/v1/usage/user/alice?days=30")).json()

    total = f"${api['totals']['cost_usd']}"
    assert cell_texts(page, "spend-30d") == [total]
    assert cell_texts(page, "spend-today") == [total]  # every call was made today
    assert cell_texts(page, "spend-7d") == [total]
    assert Decimal(api["totals"]["cost_usd"]) > 0
    assert 'data-testid="unpriced"' in page and "house-model-without-a-price" in page
    assert task in page  # the top tasks
    assert "carol" not in page
    assert 'id="chart-by-model"' in page and 'id="chart-by-user"' not in page  # users: admins


async def test_an_administrators_overview_covers_everyone_and_their_budgets(
    start_console: StartConsole,
) -> None:
    console = await start_console(budget_global_daily_usd="2.5")
    _, key = console.issue("root", "admin")
    call(console, queue_task(console, "alice"), "alice")
    call(console, queue_task(console, "bob"), "bob")
    browser = console.browser()
    await browser.sign_in(key)

    page = (await browser.get("/")).text
    overall = (await console.api(key).get("/api/v1/usage/overall?days=30")).json()
    limits = (await console.api(key).get("/api/v1/limits/global")).json()

    assert cell_texts(page, "spend-30d") == [f"${overall['totals']['cost_usd']}"]
    assert 'id="chart-by-user"' in page and "alice" in page and "bob" in page
    assert "Everyone, today (UTC)" in page and "$2.5" in page
    assert f"${limits['spent_usd']}" in page


async def test_a_fresh_install_says_what_to_do_next(start_console: StartConsole) -> None:
    console = await start_console()
    browser = console.browser()  # open local mode: the local administrator

    overview = (await browser.get("/")).text
    tasks = (await browser.get("/tasks")).text
    usage = (await browser.get("/usage")).text
    keys = (await browser.get("/keys")).text

    assert 'data-testid="empty-overview"' in overview and "/tasks/new?example=1" in overview
    assert 'data-testid="empty-tasks"' in tasks and "buggy-calculator" in tasks
    assert "python3 -m unittest -v" in tasks
    assert 'data-testid="empty-usage"' in usage
    assert "open local mode" in keys


async def test_the_task_page_lists_each_call_in_order_with_the_exports_figures(
    start_console: StartConsole, tracer: Tracer
) -> None:
    console = await start_console(jaeger_ui_url="http://jaeger.example:16686/")
    _, key = console.issue("alice")
    task = queue_task(console, "alice")
    for agent in ("FixAgent", "CodeAgent", "TestGenerator"):
        call(console, task, "alice", agent, tracer=tracer)
    browser = console.browser()
    await browser.sign_in(key)

    page = (await browser.get(f"/tasks/{task}")).text
    rows = (await console.api(key).get(f"/api/v1/usage/export?format=json&task_id={task}")).json()
    usage = (await console.api(key).get(f"/api/v1/usage/task/{task}")).json()

    assert re.findall(r'<tr data-request="([^"]+)">', page) == [r["request_id"] for r in rows]
    costs = re.findall(r'data-testid="call-cost">(\$[0-9.]+)', page)
    assert costs == [f"${r['cost_usd']}" for r in rows]
    assert cell_texts(page, "calls-total") == [f"${usage['totals']['cost_usd']}"]
    assert cell_texts(page, "task-cost") == [f"${usage['totals']['cost_usd']}"]
    for row in rows:
        assert f"http://jaeger.example:16686/trace/{row['trace_id']}" in page
    assert page.index("FixAgent") < page.index("CodeAgent") < page.index("TestGenerator")
    assert 'data-stream="/tasks/' in page  # queued: the page follows its events
    detail = await browser.get(f"/tasks/{task}/live?part=detail", headers={"HX-Request": "true"})
    assert detail.status_code == 200 and detail.text.startswith('<div id="task-detail"')
    assert all(r["request_id"] in detail.text for r in rows)


async def test_the_events_fragment_is_the_apis_stream(start_console: StartConsole) -> None:
    console = await start_console()
    _, key = console.issue("alice")
    task = queue_task(console, "alice")
    browser = console.browser()
    await browser.sign_in(key)
    cancelled = await browser.post_form(f"/tasks/{task}/cancel", {}, token_from=f"/tasks/{task}")

    stream = await browser.get(f"/tasks/{task}/events")

    assert cancelled.status_code == 303
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert "event: status" in stream.text and '"message":"cancelled"' in stream.text
    assert stream.text.rstrip().endswith('data: {"status": "cancelled"}')


async def test_the_usage_page_groups_as_the_usage_api_counts(start_console: StartConsole) -> None:
    console = await start_console()
    _, key = console.issue("alice")
    task = queue_task(console, "alice")
    call(console, task, "alice", "FixAgent", "gpt-4o-mini")
    call(console, task, "alice", "CodeAgent", "gpt-4o")
    call(console, task, "alice", "CodeAgent", "gpt-4o")
    browser = console.browser()
    await browser.sign_in(key)
    api = (await console.api(key).get("/api/v1/usage/user/alice?days=30")).json()

    by_model = await browser.get("/usage/table.csv?group_by=model")
    by_agent = (await browser.get("/usage?group_by=agent")).text
    calls = await browser.get("/usage/export.csv")

    table = list(csv.DictReader(io.StringIO(by_model.text)))
    assert [(r["model"], r["cost_usd"]) for r in table[:-1]] == [
        (m["model"], m["cost_usd"]) for m in api["by_model"]
    ]
    assert table[-1]["model"] == "Total" and table[-1]["cost_usd"] == api["totals"]["cost_usd"]
    assert table[-1]["requests"] == "3"
    assert "CodeAgent" in by_agent and "FixAgent" in by_agent
    exported = list(csv.DictReader(io.StringIO(calls.text)))
    assert len(exported) == 3 and {r["user_id"] for r in exported} == {"alice"}
    bad = await browser.get("/usage?since=2026-13-01")
    assert bad.status_code == 422 and "since must be a date" in bad.text


async def test_submitting_from_the_form_queues_the_task_as_the_api_does(
    start_console: StartConsole,
) -> None:
    console = await start_console()
    _, key = console.issue("bob")
    browser = console.browser()
    await browser.sign_in(key)
    good = {
        "repo_url": "https://example.com/bob/repo.git",
        "bug_description": "the parser drops the last line",
        "test_command": "pytest -q",
        "max_cost_usd": "0.25",
    }

    blank = await browser.post_form("/tasks/new", {**good, "test_command": " "})
    local = await browser.post_form("/tasks/new", {**good, "repo_url": "/etc"})
    submitted = await browser.post_form("/tasks/new", good)

    assert blank.status_code == 422 and "test_command" in blank.text
    assert local.status_code == 422 and 'id="submit-error"' in local.text
    assert "the parser drops the last line" in local.text  # what was typed is kept
    assert submitted.status_code == 303
    task_id = submitted.headers["location"].rsplit("/", 1)[1]
    task = (await console.api(key).get(f"/api/v1/task/{task_id}")).json()
    assert task["status"] == "queued" and task["repo_url"] == good["repo_url"]
    assert task["max_cost_usd"] == "0.25"
    listed = (await console.api(key).get("/api/v1/task")).json()
    assert listed["total"] == 1


async def test_the_task_list_pages_and_filters(start_console: StartConsole) -> None:
    console = await start_console(task_max_queued_per_user=100)
    _, admin_key = console.issue("root", "admin")
    for i in range(55):
        queue_task(console, "alice", f"https://example.com/alice/r{i}.git")
    queue_task(console, "bob", "https://example.com/bob/only.git")
    browser = console.browser()
    await browser.sign_in(admin_key)

    first = (await browser.get("/tasks")).text
    older = re.findall(r'id="older" href="([^"]+)"|href="([^"]+)" rel="next" id="older"', first)
    second = (await browser.get(html.unescape(older[0][1]))).text
    bobs = (await browser.get("/tasks?user=bob")).text
    by_repo = (await browser.get("/tasks/rows?repo=r1")).text
    cancelled = (await browser.get("/tasks?status=cancelled")).text

    row = re.compile(r'<tr data-task="([^"]+)"')
    assert len(row.findall(first)) == 50 and "56 in all" in first
    assert len(row.findall(second)) == 6 and 'id="older"' not in second
    assert not set(row.findall(first)) & set(row.findall(second))
    assert "bob/only.git" in first  # the newest, queued last
    assert len(row.findall(bobs)) == 1 and "bob/only.git" in bobs
    assert len(row.findall(by_repo)) == 11  # r1, r10-r19
    assert by_repo.startswith('<tbody id="task-rows" hx-get="/tasks/rows?repo=r1"')
    assert "No task matches these filters" in cancelled
    assert (await browser.get("/tasks?status=lost")).status_code == 422
    assert (await browser.get("/tasks?before=yesterday")).status_code == 422


async def test_an_administrator_changes_limits_from_the_budgets_page(
    start_console: StartConsole,
) -> None:
    console = await start_console()
    _, key = console.issue("root", "admin")
    browser = console.browser()
    await browser.sign_in(key)
    api = console.api(key)

    set_limit = await browser.post_form(
        "/budgets", {"scope": "user_daily", "subject_id": "bob", "limit_usd": "5.000000000001"}
    )
    after_set = (await api.get("/api/v1/limits/users/bob")).json()["daily"]
    page = (await browser.get("/budgets?user=bob")).text
    unlimited = await browser.post_form(
        "/budgets", {"scope": "global_daily", "unlimited": "on", "action": "set"}
    )
    after_unlimited = (await api.get("/api/v1/limits/global")).json()
    removed = await browser.post_form(
        "/budgets", {"scope": "user_daily", "subject_id": "bob", "action": "remove"}
    )
    after_remove = (await api.get("/api/v1/limits/users/bob")).json()["daily"]
    invalid = await browser.post_form(
        "/budgets", {"scope": "user_daily", "subject_id": "bob", "limit_usd": "lots"}
    )

    assert set_limit.status_code == 303 and set_limit.headers["location"] == "/budgets?user=bob"
    assert after_set["limit_usd"] == "5.000000000001" and after_set["limit_source"] == "override"
    assert "$5.000000000001" in page
    assert unlimited.status_code == 303
    assert after_unlimited["limit_usd"] is None and after_unlimited["limit_source"] == "override"
    assert removed.status_code == 303 and after_remove["limit_source"] == "none"
    assert invalid.status_code == 422 and 'id="budget-error"' in invalid.text


async def test_a_key_created_in_the_console_is_shown_once_and_works(
    start_console: StartConsole,
) -> None:
    console = await start_console()
    _, key = console.issue("root", "admin")
    browser = console.browser()
    await browser.sign_in(key)

    created = await browser.post_form("/keys", {"user_id": "dave", "role": "user", "name": "ci"})
    new_key = re.findall(r'data-testid="new-key">([^<]+)<', created.text)[0]
    listing = (await browser.get("/keys")).text
    invalid = await browser.post_form("/keys", {"user_id": "not a user id"})

    assert created.headers["cache-control"] == "no-store"
    assert new_key not in listing and "dave" in listing
    assert (await console.api(new_key).get("/api/v1/task")).status_code == 200
    assert invalid.status_code == 422


async def test_a_long_usage_table_sums_its_tail_in_one_row(start_console: StartConsole) -> None:
    from datetime import UTC, datetime

    from app.access.principal import Principal
    from app.web import usage as usage_view

    console = await start_console()
    for user in ("ann", "ben", "cid"):
        call(console, None, user)
    admin = Principal("root", "admin")
    query = usage_view.parse_query(admin, "user", None, None, None, datetime.now(UTC).date())

    with console.runtime.session_factory() as session:
        table = usage_view.usage_table(session, query, limit=1)
        everything = usage_view.usage_table(session, query, limit=None)

    assert len(table.rows) == 1 and table.rest is not None
    assert table.rest.key == "2 more (in the CSV)" and table.rest.requests == 2
    assert table.rows[0].cost_usd + table.rest.cost_usd == table.total.cost_usd
    assert len(everything.rows) == 3 and everything.rest is None


async def test_todays_calls_show_at_once_on_an_administrators_cached_pages(
    start_console: StartConsole,
) -> None:
    console = await start_console()
    _, key = console.issue("root", "admin")
    browser = console.browser()
    await browser.sign_in(key)
    call(console, queue_task(console, "alice"), "alice")
    before_overview = (await browser.get("/")).text
    before_usage = (await browser.get("/usage?group_by=user")).text

    late_task = queue_task(console, "erin")
    call(console, late_task, "erin")
    overview = (await browser.get("/")).text
    usage = (await browser.get("/usage?group_by=user")).text
    api = (await console.api(key).get("/api/v1/usage/overall?days=30")).json()

    assert "erin" not in before_overview and "erin" not in before_usage
    assert "erin" in overview and late_task in overview
    assert re.search(r'<a href="/usage\?[^"]*user=erin">erin</a>', usage)
    assert cell_texts(overview, "spend-30d") == [f"${api['totals']['cost_usd']}"]
