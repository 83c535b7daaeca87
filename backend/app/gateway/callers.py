"""Who a gateway call is for: the key's user, its limits, the task and the agent.

- The key is the usual ASA key (``Authorization: Bearer asa_...``, as every SDK sends its
  ``api_key``). In open local mode (no key issued yet) a request from this machine acts as the
  local administrator, and a bearer that is not an ASA key (an SDK needs *some* ``api_key``) is
  taken as no key.
- A key may carry an allow-list of models (``api_keys.allowed_models``): another model is refused
  with 403 ``model_not_allowed`` before anything is sent.
- ``X-ASA-Task-Id`` must name a task of the key's user (any task for an administrator); any other
  id is refused with 404 ``task_not_found`` - it is not ignored, because a caller who sends it
  expects the task's budget to apply. So nobody can book spend on, or use the budget of, someone
  else's task.
- ``X-ASA-Agent`` is a free label: the ``agent`` of the row as sent; on the metrics a process
  shows at most ``GATEWAY_MAX_AGENT_LABELS`` distinct agents, later new ones as ``other``
  (``app.observability.agent_label``), so the series stay bounded and the ledger stays exact.

The lookups are cached in memory: a key's limits for ``KEY_LIMITS_SECONDS`` (a change made by
another process applies within that time), a task's owner for good (it never changes).
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.access import api_keys
from app.access.principal import Principal
from app.api.auth import AccessControl, is_loopback
from app.core.db import transaction
from app.core.errors import AppError
from app.gateway.errors import GatewayError, from_app_error
from app.models import Task

KEY_LIMITS_SECONDS = 1.0
MAX_CACHED = 4096
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/ -]{0,63}$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$")
_FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


@dataclass(frozen=True, slots=True)
class Caller:
    """The principal of a gateway call and what its key allows."""

    principal: Principal
    allowed_models: frozenset[str] | None  # None: any model

    @property
    def key_id(self) -> str | None:
        return self.principal.key_id

    def ensure_model_allowed(self, model: str) -> None:
        if self.allowed_models is not None and model not in self.allowed_models:
            raise GatewayError(
                403,
                f"This API key may not use the model '{model}'.",
                code="model_not_allowed",
                param="model",
            )


class Callers:
    """Resolves requests to callers; one per running gateway."""

    def __init__(self, access: AccessControl, session_factory: sessionmaker[Session]) -> None:
        self._access = access
        self._session_factory = session_factory
        self._lock = threading.Lock()
        self._limits: dict[str, tuple[frozenset[str] | None, float]] = {}
        self._task_owners: OrderedDict[str, str] = OrderedDict()

    def caller(self, authorization: str | None, client_host: str | None, forwarded: bool) -> Caller:
        """The caller of a request with this ``Authorization`` header."""
        authenticator = self._access.authenticator
        key: str | None = None
        if authorization is not None:
            scheme, _, credentials = authorization.partition(" ")
            if scheme.lower() != "bearer" or not credentials.strip():
                raise GatewayError(
                    401,
                    "The Authorization header must read: Bearer <key>.",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            key = credentials.strip()
            if not key.startswith(api_keys.KEY_SCHEME) and authenticator.mode == "open":
                key = None  # open local mode: an SDK's placeholder key is no key
        local = is_loopback(client_host) and not forwarded
        try:
            principal = authenticator.authenticate(key, local_request=local)
        except AppError as exc:
            raise from_app_error(exc) from None
        allowed = None if principal.key_id is None else self._allowed_models(principal.key_id)
        return Caller(principal, allowed)

    def _allowed_models(self, key_id: str) -> frozenset[str] | None:
        now = time.monotonic()
        with self._lock:
            cached = self._limits.get(key_id)
        if cached is not None and cached[1] > now:
            return cached[0]
        with transaction(self._session_factory) as session:
            models = api_keys.allowed_models(session, key_id)
        allowed = None if models is None else frozenset(models)
        with self._lock:
            if len(self._limits) >= MAX_CACHED:
                self._limits.clear()
            self._limits[key_id] = (allowed, now + KEY_LIMITS_SECONDS)
        return allowed

    def task_id(self, caller: Caller, value: str | None) -> str | None:
        """The task a call is booked to, checked against the caller (see the module doc)."""
        if value is None or value == "":
            return None
        if not _ID_RE.fullmatch(value):
            raise GatewayError(
                400,
                "X-ASA-Task-Id must be 1-64 characters: letters, digits and . _ : @ -.",
                code="invalid_task_id",
            )
        owner = self._task_owner(value)
        principal = caller.principal
        if owner is None or (owner != principal.user_id and not principal.is_admin):
            raise GatewayError(404, f"No task {value} of yours.", code="task_not_found")
        return value

    def _task_owner(self, task_id: str) -> str | None:
        with self._lock:
            owner = self._task_owners.get(task_id)
        if owner is not None:
            return owner
        with transaction(self._session_factory) as session:
            owner = session.scalar(select(Task.user_id).where(Task.id == task_id))
        if owner is not None:
            with self._lock:
                self._task_owners[task_id] = owner
                while len(self._task_owners) > MAX_CACHED:
                    self._task_owners.popitem(last=False)
        return owner

    def agent(self, value: str | None) -> str | None:
        """The agent a call is recorded for (checked: see the module doc)."""
        if value is None or value == "":
            return None
        if not _LABEL_RE.fullmatch(value):
            raise GatewayError(
                400,
                "X-ASA-Agent must be 1-64 characters: letters, digits, space and . _ : @ / -.",
                code="invalid_agent",
            )
        return value


def is_forwarded(headers: object) -> bool:
    """Did the request come through a forwarding proxy (so it is not "from this machine")?"""
    return any(name in headers for name in _FORWARDING_HEADERS)  # type: ignore[operator]
