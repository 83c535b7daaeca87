"""Who is calling: the principal every router depends on.

Until API keys exist (issue 6) the service runs in open local mode: every request acts as the
local administrator. Routers already depend on ``CurrentPrincipal`` / ``AdminPrincipal`` so that
isolation rules are written once, where the route is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends

from app.core.errors import Forbidden

LOCAL_USER = "local"


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    role: Literal["user", "admin"]

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def ensure_can_read_user(self, user_id: str) -> None:
        """A user reads only their own data; an admin reads anyone's."""
        if not self.is_admin and user_id != self.user_id:
            raise Forbidden("You may only read your own usage.")


def current_principal() -> Principal:
    return Principal(user_id=LOCAL_USER, role="admin")


def require_admin(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
    if not principal.is_admin:
        raise Forbidden("This endpoint is for administrators.")
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
AdminPrincipal = Annotated[Principal, Depends(require_admin)]
