"""The task list, a task's page and its live parts, the submit form, cancellation."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import ValidationError

from app.api.deps import RuntimeDep, TaskId
from app.api.guards import limit_task_submissions
from app.api.v1 import tasks as tasks_api
from app.core.errors import AppError
from app.schemas.tasks import TaskSubmitRequest
from app.web import tasklist
from app.web.render import ConsoleRoute, render, see_other
from app.web.routes import unit_of_work
from app.web.session import ConsolePrincipal, SignedInForm
from app.web.taskpage import build_task_page

router = APIRouter(route_class=ConsoleRoute)
Text = Annotated[str | None, Query(max_length=200)]
Cursor = Annotated[str | None, Query(max_length=120)]


def _list(
    request: Request, principal: ConsolePrincipal, status: str | None, user: str | None,
    repo: str | None, before: str | None,
) -> tasklist.TaskList:  # fmt: skip
    flt = tasklist.parse_filter(principal, status, user, repo)
    cursor = tasklist.parse_cursor(before)
    with unit_of_work(request) as session:
        return tasklist.build_task_list(session, principal, flt, cursor)


@router.get("/tasks")
def tasks_page(
    request: Request,
    principal: ConsolePrincipal,
    runtime: RuntimeDep,
    status: Text = None,
    user: Text = None,
    repo: Text = None,
    before: Cursor = None,
) -> Response:
    listing = _list(request, principal, status, user, repo, before)
    example = runtime.settings.examples_dir / tasklist.EXAMPLE_NAME
    context = {"l": listing, "statuses": tasklist.STATUSES, "example_path": example}
    return render(request, "tasks.html", context)


@router.get("/tasks/rows")
def task_rows(
    request: Request,
    principal: ConsolePrincipal,
    status: Text = None,
    user: Text = None,
    repo: Text = None,
    before: Cursor = None,
) -> Response:
    """The list's rows alone: what the page polls while a task on it runs."""
    listing = _list(request, principal, status, user, repo, before)
    return render(request, "_task_rows.html", {"l": listing})


@router.get("/tasks/new")
def submit_page(
    request: Request, principal: ConsolePrincipal, runtime: RuntimeDep, example: bool = False
) -> Response:
    defaults = (
        tasklist.example_defaults(runtime.settings.examples_dir)
        if example and principal.is_admin
        else tasklist.SubmitDefaults()
    )
    return render(request, "submit.html", _submit_context(runtime, defaults, None))


@router.post("/tasks/new")
def submit(
    request: Request, principal: ConsolePrincipal, runtime: RuntimeDep, form: SignedInForm
) -> Response:
    """Submit as ``POST /api/v1/task/submit`` does: same checks, rate limit and handler."""
    fields = {name: form.get(name, "") for name in tasklist.SubmitDefaults.__slots__}
    values: dict[str, Any] = {k: v.strip() for k, v in fields.items() if v.strip()}
    values["bug_description"] = fields["bug_description"]
    try:
        body = TaskSubmitRequest.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{e['loc'][-1] if e['loc'] else 'form'}: {e['msg']}" for e in exc.errors()
        )
        context = _submit_context(runtime, tasklist.SubmitDefaults(**fields), problems)
        return render(request, "submit.html", context, status_code=422)
    try:
        limit_task_submissions(request, principal)
        with unit_of_work(request) as session:
            submitted = tasks_api.submit_task(body, principal, session, runtime)
    except AppError as exc:
        context = _submit_context(runtime, tasklist.SubmitDefaults(**fields), exc.detail)
        return render(request, "submit.html", context, status_code=exc.status_code)
    return see_other(f"/tasks/{submitted.task_id}")


def _submit_context(
    runtime: RuntimeDep, defaults: tasklist.SubmitDefaults, error: str | None
) -> dict[str, object]:
    return {
        "f": defaults,
        "error": error,
        "default_model": runtime.settings.default_model,
        "example_path": runtime.settings.examples_dir / tasklist.EXAMPLE_NAME,
    }


@router.get("/tasks/{task_id}")
def task_page(
    request: Request, task_id: TaskId, principal: ConsolePrincipal, runtime: RuntimeDep
) -> Response:
    with unit_of_work(request) as session:
        page = build_task_page(session, runtime.settings, principal, task_id)
    return render(request, "task.html", {"p": page})


@router.get("/tasks/{task_id}/live")
def task_live(
    request: Request,
    task_id: TaskId,
    principal: ConsolePrincipal,
    runtime: RuntimeDep,
    part: Literal["summary", "detail"] = "summary",
) -> Response:
    """A part of the task page that changes while it runs: the summary (status, cost, cancel)
    or the detail (cost against the cap, the calls, the result)."""
    with unit_of_work(request) as session:
        page = build_task_page(session, runtime.settings, principal, task_id)
    return render(request, f"_task_{part}.html", {"p": page})


@router.get("/tasks/{task_id}/events")
async def task_events(
    task_id: TaskId,
    principal: ConsolePrincipal,
    runtime: RuntimeDep,
    after: Annotated[int, Query(ge=0)] = 0,
) -> Response:
    """The task's server-sent events: the API's stream, for the signed-in user."""
    return await tasks_api.task_events(task_id, principal, runtime, after)


@router.post("/tasks/{task_id}/cancel")
def cancel(
    request: Request,
    task_id: TaskId,
    principal: ConsolePrincipal,
    runtime: RuntimeDep,
    _form: SignedInForm,
) -> Response:
    with unit_of_work(request) as session:
        tasks_api.cancel_task(task_id, principal, session, runtime)
    return see_other(f"/tasks/{task_id}")
