"""``/api/v1/admin/keys``: issue, list and revoke API keys (administrators only).

The same operations as ``asa keys create|list|revoke``. A new key is in the POST response once;
only its hash is stored.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response

from app.access import api_keys
from app.api.auth import AdminPrincipal, get_access
from app.api.deps import SessionDep
from app.schemas.api_keys import ApiKeyCreate, ApiKeyCreated, ApiKeyList, ApiKeyView

router = APIRouter(prefix="/api/v1/admin/keys", tags=["admin"])
KeyId = Annotated[str, Path(min_length=1, max_length=32, pattern=r"^[0-9a-f]+$")]


@router.post("", status_code=201, response_model=ApiKeyCreated)
def create_key(
    body: ApiKeyCreate, request: Request, session: SessionDep, _admin: AdminPrincipal
) -> ApiKeyCreated:
    """Issue a key for a user; the response holds the key, shown this once."""
    issued = api_keys.create_key(session, user_id=body.user_id, role=body.role, name=body.name)
    session.info.setdefault("after_commit", []).append(
        get_access(request).authenticator.note_key_issued
    )
    return ApiKeyCreated(**_view(issued.row).model_dump(), key=issued.key)


@router.get("", response_model=ApiKeyList)
def list_keys(session: SessionDep, _admin: AdminPrincipal) -> ApiKeyList:
    """Every key, revoked ones included, without the keys themselves."""
    return ApiKeyList(items=[_view(row) for row in api_keys.list_keys(session)])


@router.delete("/{key_id}", status_code=204, response_class=Response)
def revoke_key(
    key_id: KeyId, request: Request, session: SessionDep, _admin: AdminPrincipal
) -> None:
    """Revoke a key; it stops working at once (other processes: within a second)."""
    api_keys.revoke_key(session, key_id)
    session.info.setdefault("after_commit", []).append(
        get_access(request).authenticator.forget_cached_keys
    )


def _view(row: object) -> ApiKeyView:
    return ApiKeyView.model_validate(row)
