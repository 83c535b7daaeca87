"""Budgets (everyone sees their own; administrators change limits) and API keys
(administrators: create, shown once, and revoke)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import ValidationError

from app.access import api_keys
from app.api.auth import get_access
from app.api.deps import ID_PATTERN, RuntimeDep
from app.core.errors import AppError
from app.schemas.api_keys import ApiKeyCreate
from app.web.budgets import apply_override, build_budgets_page, parse_override_form
from app.web.render import ConsoleRoute, render, see_other
from app.web.routes import unit_of_work
from app.web.session import ConsoleAdmin, ConsolePrincipal, SignedInForm

router = APIRouter(route_class=ConsoleRoute)
KeyId = Annotated[str, Path(min_length=1, max_length=32, pattern=r"^[0-9a-f]+$")]


@router.get("/budgets")
def budgets_page(
    request: Request,
    principal: ConsolePrincipal,
    runtime: RuntimeDep,
    user: Annotated[str | None, Query(max_length=64, pattern=ID_PATTERN)] = None,
) -> Response:
    with unit_of_work(request) as session:
        page = build_budgets_page(session, runtime.settings, principal, user)
    return render(request, "budgets.html", {"b": page, "error": None})


@router.post("/budgets")
def change_budget(
    request: Request, admin: ConsoleAdmin, runtime: RuntimeDep, form: SignedInForm
) -> Response:
    """Set (a limit, or explicitly unlimited) or remove an override, as the limits API does."""
    try:
        change = parse_override_form(form)
        with unit_of_work(request) as session:
            apply_override(session, runtime.settings, admin, change)
    except AppError as exc:
        with unit_of_work(request) as session:
            page = build_budgets_page(session, runtime.settings, admin, None)
        context = {"b": page, "error": exc.detail}
        return render(request, "budgets.html", context, status_code=exc.status_code)
    user = change.subject_id if change.scope.value.startswith("user") else ""
    return see_other("/budgets" + (f"?user={user}" if user else ""))


@router.get("/keys")
def keys_page(request: Request, _admin: ConsoleAdmin) -> Response:
    with unit_of_work(request) as session:
        keys = api_keys.list_keys(session)
    return render(request, "keys.html", {"keys": keys, "created": None, "error": None})


@router.post("/keys")
def create_key(request: Request, _admin: ConsoleAdmin, form: SignedInForm) -> Response:
    """Issue a key (as ``POST /api/v1/admin/keys``); the page shows it this once."""
    try:
        body = ApiKeyCreate.model_validate(
            {
                "user_id": form.get("user_id", "").strip(),
                "role": form.get("role", "user"),
                "name": form.get("name", "").strip() or None,
            }
        )
    except ValidationError as exc:
        fields = ", ".join(str(e["loc"][-1]) for e in exc.errors() if e["loc"])
        with unit_of_work(request) as session:
            keys = api_keys.list_keys(session)
        context = {"keys": keys, "created": None, "error": f"Not a valid value: {fields}."}
        return render(request, "keys.html", context, status_code=422)
    with unit_of_work(request) as session:
        issued = api_keys.create_key(session, user_id=body.user_id, role=body.role, name=body.name)
        session.info.setdefault("after_commit", []).append(
            get_access(request).authenticator.note_key_issued
        )
        keys = api_keys.list_keys(session)
    return render(request, "keys.html", {"keys": keys, "created": issued, "error": None})


@router.post("/keys/{key_id}/revoke")
def revoke_key(
    request: Request, key_id: KeyId, _admin: ConsoleAdmin, _form: SignedInForm
) -> Response:
    """Revoke (as ``DELETE /api/v1/admin/keys/{id}``): it stops working at once, and so does
    every console session signed in with it."""
    with unit_of_work(request) as session:
        api_keys.revoke_key(session, key_id)
        session.info.setdefault("after_commit", []).append(
            get_access(request).authenticator.forget_cached_keys
        )
    return see_other("/keys")
