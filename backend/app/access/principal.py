"""Who a request acts as: a user or an administrator, resolved by ``app.api.auth``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from app.core.errors import Forbidden

# The user of open local mode (no API key exists yet).
LOCAL_USER = "local"


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    role: Literal["user", "admin"]
    key_id: str | None = None  # None in open local mode

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def ensure_can_read_user(self, user_id: str) -> None:
        """A user reads only their own data; an admin reads anyone's."""
        if not self.is_admin and user_id != self.user_id:
            raise Forbidden("You may only read your own usage.")
