"""A task's page: its view (the API's ``TaskView``), events so far, LLM calls in order, cost
against its cap, and the diff split into lines to highlight.

Visibility is ``app.tasks.store.get_visible_task``'s: another user's task is "not found".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy.orm import Session

from app.access.principal import Principal
from app.budgets import limits as budget_limits
from app.core.config import Settings
from app.core.money import pico_to_usd
from app.models import BudgetScope, LLMUsage, TaskEvent
from app.schemas.tasks import TaskView
from app.tasks import store as task_store
from app.tasks.views import task_view
from app.web import queries
from app.web.budgets import Budget
from app.web.render import utc

API_TASKS = "/api/v1/task"


@dataclass(frozen=True, slots=True)
class DiffLine:
    kind: str  # file, hunk, add, del, context
    text: str


@dataclass(frozen=True, slots=True)
class CallRow:
    number: int
    call: LLMUsage
    cost_usd: Decimal
    trace_url: str | None


@dataclass
class TaskPage:
    task: TaskView
    cap: Budget
    events: Sequence[TaskEvent]
    calls: list[CallRow]
    calls_cost_usd: Decimal
    calls_truncated: bool
    diff: list[DiffLine]
    duration: timedelta | None

    @property
    def running(self) -> bool:
        return self.task.result is None

    @property
    def last_event_id(self) -> int:
        return self.events[-1].id if self.events else 0


def diff_lines(diff: str | None) -> list[DiffLine]:
    """Each line of a unified diff with its kind, for the page's colours (no markup here: the
    template escapes the text)."""
    lines: list[DiffLine] = []
    for text in (diff or "").splitlines():
        if text.startswith(("diff --git", "+++ ", "--- ", "index ", "new file", "deleted file")):
            kind = "file"
        elif text.startswith("@@"):
            kind = "hunk"
        elif text.startswith("+"):
            kind = "add"
        elif text.startswith("-"):
            kind = "del"
        else:
            kind = "context"
        lines.append(DiffLine(kind, text))
    return lines


def call_rows(calls: Sequence[LLMUsage], jaeger_ui_url: str | None) -> list[CallRow]:
    base = jaeger_ui_url.rstrip("/") if jaeger_ui_url else None
    return [
        CallRow(
            number=i,
            call=call,
            cost_usd=pico_to_usd(call.cost_pico_usd),
            trace_url=f"{base}/trace/{call.trace_id}" if base and call.trace_id else None,
        )
        for i, call in enumerate(calls, start=1)
    ]


def build_task_page(
    session: Session, settings: Settings, principal: Principal, task_id: str
) -> TaskPage:
    task = task_store.get_visible_task(session, principal, task_id)
    spend = task_store.task_spend(session, [task.id]).get(task.id, (0, 0))
    view = task_view(task, spend, f"{API_TASKS}/{task.id}")
    calls = queries.task_calls(session, task.id)
    cap = budget_limits.scope_status(session, settings, BudgetScope.TASK, task.id)
    return TaskPage(
        task=view,
        cap=Budget("This task (its whole life)", cap),
        events=task_store.events_after(session, task.id, 0, limit=500),
        calls=call_rows(calls, settings.jaeger_ui_url),
        calls_cost_usd=pico_to_usd(sum(c.cost_pico_usd for c in calls)),
        calls_truncated=len(calls) >= queries.MAX_TASK_CALLS,
        diff=diff_lines(view.result.diff if view.result else None),
        duration=_duration(view, datetime.now(UTC)),
    )


def _duration(view: TaskView, now: datetime) -> timedelta | None:
    """From its start to its end, or to now while it runs."""
    started = utc(view.started_at)
    if started is None:
        return None
    return (utc(view.finished_at) or now) - started
