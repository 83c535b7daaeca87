"""The task list (filters, paging, cost and duration of each row) and the submit form's
example.

Rows come from ``app.web.queries.list_tasks`` (the API's visibility rule) and their spend from
``app.tasks.store.task_spend``, as ``GET /api/v1/task`` computes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import get_args

from sqlalchemy.orm import Session

from app.access.principal import Principal
from app.core.errors import InvalidInput
from app.core.money import pico_to_usd
from app.models import TERMINAL_TASK_STATUSES, Task
from app.schemas.tasks import TaskStatus
from app.tasks import store as task_store
from app.web import queries
from app.web.render import utc

PAGE_SIZE = 50
STATUSES: tuple[str, ...] = get_args(TaskStatus)
EXAMPLE_NAME = "buggy-calculator"
EXAMPLE_BUG = "average() in calculator.py is wrong: average([2, 4, 6]) should be 4"
EXAMPLE_TEST_COMMAND = "python3 -m unittest -v"


@dataclass(frozen=True, slots=True)
class TaskRow:
    task: Task
    cost_usd: Decimal
    calls: int
    duration: timedelta | None

    @property
    def running(self) -> bool:
        return self.task.status not in TERMINAL_TASK_STATUSES


@dataclass(frozen=True, slots=True)
class TaskList:
    flt: queries.TaskFilter
    rows: list[TaskRow]
    total: int | None  # None: not counted (a repository substring filter)
    before: queries.TaskCursor | None  # where this page starts (None: the newest)
    older: queries.TaskCursor | None  # where the next page starts (None: no more)

    @property
    def any_running(self) -> bool:
        return any(row.running for row in self.rows)

    @property
    def filtered(self) -> bool:
        return bool(self.flt.status or self.flt.user_id or self.flt.repo)

    def query(self) -> dict[str, str]:
        """This page's query string parameters (the live refresh asks for the same page)."""
        return self.query_at(self.before)

    def query_at(self, before: queries.TaskCursor | None) -> dict[str, str]:
        """The parameters of the page starting at ``before`` (None: the newest) with these
        filters."""
        params = {
            "status": self.flt.status or "",
            "user": self.flt.user_id or "",
            "repo": self.flt.repo or "",
            "before": before.encode() if before is not None else "",
        }
        return {k: v for k, v in params.items() if v}


def parse_filter(
    principal: Principal, status: str | None, user: str | None, repo: str | None
) -> queries.TaskFilter:
    if status and status not in STATUSES:
        raise InvalidInput(f"status must be one of {', '.join(STATUSES)}.", field="status")
    return queries.TaskFilter(
        status=status or None,
        user_id=(user or None) if principal.is_admin else None,
        repo=(repo or "").strip()[:200] or None,
    )


def parse_cursor(before: str | None) -> queries.TaskCursor | None:
    if not before:
        return None
    try:
        return queries.TaskCursor.decode(before)
    except ValueError as exc:
        raise InvalidInput("before is not a position in the task list.", field="before") from exc


def build_task_list(
    session: Session,
    principal: Principal,
    flt: queries.TaskFilter,
    before: queries.TaskCursor | None = None,
) -> TaskList:
    page = queries.list_tasks(session, principal, flt, PAGE_SIZE, before)
    spend = task_store.task_spend(session, [t.id for t in page.rows])
    now = datetime.now(UTC)
    items = []
    for task in page.rows:
        cost, calls = spend.get(task.id, (0, 0))
        started = utc(task.started_at)
        ended = utc(task.finished_at) or (now if task.status == "running" else None)
        duration = ended - started if started and ended else None
        items.append(TaskRow(task, pico_to_usd(cost), calls, duration))
    return TaskList(
        flt=flt,
        rows=items,
        total=page.total,
        before=before,
        older=page.older,
    )


@dataclass(frozen=True, slots=True)
class SubmitDefaults:
    repo_url: str = ""
    bug_description: str = ""
    test_command: str = ""
    model: str = ""
    max_cost_usd: str = ""
    max_attempts: str = "3"
    ref: str = ""


def example_defaults(examples_dir: Path) -> SubmitDefaults:
    """The bundled example, as the README's walkthrough submits it."""
    return SubmitDefaults(
        repo_url=str(examples_dir / EXAMPLE_NAME),
        bug_description=EXAMPLE_BUG,
        test_command=EXAMPLE_TEST_COMMAND,
    )
