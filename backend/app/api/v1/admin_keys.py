"""``/api/v1/admin/keys``: issue, list, limit and revoke API keys (administrators only).

The same operations as ``asa keys create|list|limit|revoke``. A new key is in the POST response
once; only its hash is stored. A key's limits - the models it may call through the gateway and
a budget of its own - are set at creation or with PATCH.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from sqlalchemy.orm import Session

from app.access import api_keys
from app.api.auth import AdminPrincipal, get_access
from app.api.deps import RuntimeDep, SessionDep
from app.budgets import limits as budget_limits
from app.core.config import Settings
from app.core.money import pico_to_usd
from app.models import ApiKey
from app.schemas.api_keys import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyList,
    ApiKeyUpdate,
    ApiKeyView,
)

router = APIRouter(prefix="/api/v1/admin/keys", tags=["admin"])
KeyId = Annotated[str, Path(min_length=1, max_length=32, pattern=r"^[0-9a-f]+$")]


@router.post("", status_code=201, response_model=ApiKeyCreated)
def create_key(
    body: ApiKeyCreate,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    admin: AdminPrincipal,
) -> ApiKeyCreated:
    """Issue a key for a user, with its limits; the response holds the key, shown this once."""
    issued = api_keys.create_key(
        session,
        user_id=body.user_id,
        role=body.role,
        name=body.name,
        allowed_models=body.allowed_models,
    )
    if body.budget_usd is not None:
        budget_limits.set_key_budget(
            session, runtime.settings, issued.row.id, body.budget_usd, updated_by=admin.user_id
        )
    session.info.setdefault("after_commit", []).append(
        get_access(request).authenticator.note_key_issued
    )
    view = _view(session, runtime.settings, issued.row)
    return ApiKeyCreated(**view.model_dump(), key=issued.key)


@router.get("", response_model=ApiKeyList)
def list_keys(session: SessionDep, runtime: RuntimeDep, _admin: AdminPrincipal) -> ApiKeyList:
    """Every key, revoked ones included, without the keys themselves."""
    rows = api_keys.list_keys(session)
    return ApiKeyList(items=[_view(session, runtime.settings, row) for row in rows])


@router.patch("/{key_id}", response_model=ApiKeyView)
def update_key(
    key_id: KeyId,
    body: ApiKeyUpdate,
    session: SessionDep,
    runtime: RuntimeDep,
    admin: AdminPrincipal,
) -> ApiKeyView:
    """Change a key's limits: a field left out is kept, null removes the limit. A running
    gateway applies a change within a second."""
    row = api_keys.get_key(session, key_id)
    if "allowed_models" in body.model_fields_set:
        row = api_keys.set_allowed_models(session, key_id, body.allowed_models)
    if "budget_usd" in body.model_fields_set:
        budget_limits.set_key_budget(
            session, runtime.settings, key_id, body.budget_usd, updated_by=admin.user_id
        )
    return _view(session, runtime.settings, row)


@router.delete("/{key_id}", status_code=204, response_class=Response)
def revoke_key(
    key_id: KeyId, request: Request, session: SessionDep, _admin: AdminPrincipal
) -> None:
    """Revoke a key; it stops working at once (other processes: within a second)."""
    api_keys.revoke_key(session, key_id)
    session.info.setdefault("after_commit", []).append(
        get_access(request).authenticator.forget_cached_keys
    )


def _view(session: Session, settings: Settings, row: ApiKey) -> ApiKeyView:
    view = ApiKeyView.model_validate(row)
    budget = budget_limits.key_budget(session, settings, row.id)
    if budget is not None and budget.limit.limit_pico is not None:
        view.budget_usd = pico_to_usd(budget.limit.limit_pico)
        view.budget_spent_usd = pico_to_usd(budget.spent_pico)
    return view
