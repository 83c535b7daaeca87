"""The console in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven
by Selenium), against the service running with uvicorn on a loopback port and the built-in
simulator, on SQLite and PostgreSQL.

An administrator signs in with her key, submits the bundled example from the form, watches it
reach ``succeeded`` on the task page (its events arrive over the server-sent stream), reads the
diff and each LLM call, and every cost on the page equals the usage API's to the last digit;
the overview's chart is drawn. A user with a key of his own then sees none of her tasks, and his
session ends when his key is revoked. No page logs a Content-Security-Policy violation.

Screenshots of every page are written to ``ASA_SCREENSHOTS_DIR`` (the README's come from
``ASA_SCREENSHOTS_DIR=../docs/images``), else to the test's temporary directory.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ScratchDatabase
from tests.support.live_service import Live, live_service_on

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip(
        "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )
pytest.importorskip("selenium", reason="needs selenium (the backend's dev extras)")
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

TASK_TIMEOUT_SECONDS = 180
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
)


@pytest.fixture(params=["sqlite", "postgresql"])
def live(
    request: pytest.FixtureRequest, tmp_path: Path, scratch_postgres_database: ScratchDatabase
) -> Iterator[Live]:
    with live_service_on(request.param, tmp_path, scratch_postgres_database) as service:
        yield service


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


class Pages:
    """The browser on the live service, with the checks every page passes."""

    def __init__(self, driver: Any, live: Live, shots: Path | None) -> None:
        self.driver = driver
        self.live = live
        self.shots = shots

    def open(self, path: str) -> None:
        self.driver.get(self.live.base + path)
        self.wait_for(lambda d: d.execute_script("return document.readyState") == "complete")

    def wait_for(self, condition: Any, timeout: float = 15) -> Any:
        # htmx replaces the live parts of a page while it is read: an element may go stale.
        ignored = (NoSuchElementException, StaleElementReferenceException)
        wait = WebDriverWait(self.driver, timeout, poll_frequency=0.2, ignored_exceptions=ignored)
        return wait.until(condition)

    def css(self, selector: str) -> Any:
        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def texts(self, selector: str) -> list[str]:
        """The rendered text of every match, read in one script (no element can go stale)."""
        return list(
            self.driver.execute_script(
                "return [...document.querySelectorAll(arguments[0])].map(e => e.innerText);",
                selector,
            )
        )

    def text(self, selector: str) -> str:
        found = self.texts(selector)
        assert len(found) == 1, (selector, found)
        return found[0]

    def attribute(self, selector: str, name: str) -> str | None:
        value = self.driver.execute_script(
            "const e = document.querySelector(arguments[0]); "
            "return e ? e.getAttribute(arguments[1]) : null;",
            selector,
            name,
        )
        return None if value is None else str(value)

    def sign_in(self, key: str) -> None:
        self.driver.delete_all_cookies()
        self.open("/login")
        self.css("#api_key").send_keys(key)
        self.css("form[action='/login'] button[type=submit]").click()
        self.wait_for(lambda d: "/login" not in d.current_url)

    def assert_no_policy_violation(self) -> None:
        messages = [entry["message"] for entry in self.driver.get_log("browser")]
        assert not [m for m in messages if "Content Security Policy" in m], messages

    def screenshot(self, name: str) -> None:
        if self.shots is None:
            return
        script = (
            "return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)"
        )
        height = int(self.driver.execute_script(script))
        # The window's frame takes some of its height: make the page's viewport the page.
        inner = int(self.driver.execute_script("return window.innerHeight"))
        self.driver.set_window_size(1280, min(max(height + (900 - inner), 900), 2600))
        self.driver.save_screenshot(str(self.shots / f"console-{name}.png"))
        self.driver.set_window_size(1280, 900)


def _canvas_pixels(driver: Any, canvas_id: str) -> int:
    return int(
        driver.execute_script(
            """
            const canvas = document.getElementById(arguments[0]);
            const context = canvas.getContext('2d');
            const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
            let painted = 0;
            for (let i = 3; i < data.length; i += 4) { if (data[i] !== 0) painted++; }
            return painted;
            """,
            canvas_id,
        )
    )


def test_a_user_fixes_the_example_in_the_browser_and_the_costs_are_the_apis(
    live: Live, browser: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    shots_dir = os.environ.get("ASA_SCREENSHOTS_DIR")
    shots = Path(shots_dir) if shots_dir else tmp_path / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    # One database's screenshots are enough for the docs.
    on_sqlite = "sqlite" in request.node.callspec.id
    pages = Pages(browser, live, shots if on_sqlite or not shots_dir else None)

    pages.open("/login")
    pages.screenshot("sign-in")
    pages.sign_in(live.admin_key)
    assert pages.text("[data-testid=user]") == "alice"
    assert pages.css("[data-testid=empty-overview]").is_displayed()

    # Submit the bundled example from the form.
    pages.open("/tasks")
    pages.css("[data-testid=empty-tasks] a.button").click()
    pages.wait_for(lambda d: "/tasks/new" in d.current_url)
    assert pages.css("#repo_url").get_attribute("value").endswith("buggy-calculator")
    pages.screenshot("submit")
    pages.css("#submit-form button[type=submit]").click()
    pages.wait_for(lambda d: "/tasks/tsk_" in d.current_url)
    task_id = browser.current_url.rsplit("/", 1)[1]

    # Watch it run: the live panels follow the event stream to the end.
    pages.wait_for(
        lambda _: pages.attribute("#task-summary", "data-status") not in ("queued", "running"),
        timeout=TASK_TIMEOUT_SECONDS,
    )
    assert pages.attribute("#task-summary", "data-status") == "succeeded"
    pages.wait_for(lambda _: pages.text("#stream-state") == "finished")
    events = pages.texts("#events li")
    assert any("succeeded" in e for e in events), events
    assert any("running" in e for e in events), events
    pages.wait_for(lambda _: pages.texts("#diff .add") and pages.texts("#llm-calls"))
    assert "return sum(values) / len(values)" in " ".join(pages.texts("#diff .add"))
    assert [b.lower() for b in pages.texts("[data-testid=tests-after] .badge")] == ["passed"]

    # Every cost on the page is the usage API's, digit for digit.
    with live.api(live.admin_key) as api:
        task = api.get(f"/api/v1/task/{task_id}").json()
        usage = api.get(f"/api/v1/usage/task/{task_id}").json()
        rows = api.get("/api/v1/usage/export", params={"format": "json", "task_id": task_id}).json()
        overall = api.get("/api/v1/usage/overall", params={"days": 30}).json()
    assert task["status"] == "succeeded" and rows
    assert pages.text("[data-testid=task-cost]") == f"${usage['totals']['cost_usd']}"
    assert pages.text("[data-testid=task-cost]") == f"${task['cost_usd']}"
    assert pages.text("[data-testid=calls-total]") == f"${usage['totals']['cost_usd']}"
    call_costs = [c.split()[0] for c in pages.texts("[data-testid=call-cost]")]
    assert call_costs == [f"${row['cost_usd']}" for row in rows]
    requests = [
        pages.attribute(f"#llm-calls tbody tr:nth-child({i})", "data-request")
        for i in range(1, len(rows) + 1)
    ]
    assert requests == [row["request_id"] for row in rows]  # in the order they were made
    assert pages.texts("#llm-calls tbody tr[data-request] td:nth-child(3)") == [
        row["agent"] or "—" for row in rows
    ]
    pages.screenshot("task")
    pages.assert_no_policy_violation()

    # The overview: the same spend, and a chart with something drawn on it.
    pages.open("/")
    pages.wait_for(lambda _: pages.attribute("#chart-by-model", "data-drawn") == "true")
    assert _canvas_pixels(browser, "chart-by-model") > 0
    assert _canvas_pixels(browser, "chart-by-user") > 0
    assert pages.text("[data-testid=spend-30d]") == f"${overall['totals']['cost_usd']}"
    pages.screenshot("overview")
    for path, name in (
        ("/tasks", "tasks"),
        ("/usage?group_by=agent", "usage"),
        ("/budgets", "budgets"),
        ("/keys", "keys"),
    ):
        pages.open(path)
        pages.screenshot(name)
    pages.open("/tasks")
    assert task_id in browser.page_source
    pages.assert_no_policy_violation()

    # Another user: none of her tasks, her task page is "not found".
    pages.sign_in(live.user_key)
    assert pages.text("[data-testid=user]") == "bob"
    pages.open("/tasks")
    assert task_id not in browser.page_source
    assert pages.css("[data-testid=empty-tasks]").is_displayed()
    pages.open(f"/tasks/{task_id}")
    assert "Not found" in pages.text("h1")

    # His key revoked: his next page is the sign-in page.
    with live.api(live.admin_key) as api:
        assert api.delete(f"/api/v1/admin/keys/{live.user_key_id}").status_code == 204
    pages.open("/tasks")
    assert "/login" in browser.current_url
    pages.assert_no_policy_violation()
