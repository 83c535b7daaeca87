"""Who is calling: the principal every router depends on.

Requests authenticate with ``Authorization: Bearer <key>`` (keys: ``app.access.api_keys``).
Until the first key is issued the service runs in open local mode: a request without a key acts
as the local administrator, but only while the server is bound to a loopback address and only
for a request that comes from this machine directly (not through a forwarding proxy). Once a
key exists, every ``/api`` route requires a valid one; revoking every key does not reopen the
service. A server bound elsewhere without any key refuses to start.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app.access import api_keys
from app.access.principal import LOCAL_USER, Principal
from app.core.config import Settings
from app.core.db import transaction
from app.core.errors import Forbidden, ServiceUnavailable, Unauthorized
from app.core.rate_limit import TokenBucketLimiter

logger = logging.getLogger(__name__)

AccessMode = Literal["open", "keys"]
# How long a verified key and the "no key exists yet" answer are trusted without the database:
# a key revoked by another process (the CLI) stops working within this time; one revoked
# through the admin API, at once.
AUTH_CACHE_SECONDS = 1.0
MAX_CACHED_KEYS = 4096
_FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


LOCAL_ADMIN = Principal(user_id=LOCAL_USER, role="admin")


class InsecureStartupError(RuntimeError):
    """The service would be reachable from other machines with no API key required."""


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


class Authenticator:
    """Resolves a bearer key to a principal, with a short in-memory cache."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        open_mode_allowed: bool,
        cache_seconds: float = AUTH_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session_factory = session_factory
        self.open_mode_allowed = open_mode_allowed
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._keys_configured = False
        self._keys_checked_at = -math.inf

    def keys_configured(self) -> bool:
        """Has any key been issued? Once true it stays true (rows are revoked, never deleted).

        Fails closed: with the database unreachable the answer is yes, so nobody gets the open
        mode's administrator by default.
        """
        if self._keys_configured:
            return True
        now = self._clock()
        if now - self._keys_checked_at >= self._cache_seconds:
            try:
                with transaction(self._session_factory) as session:
                    configured = api_keys.keys_configured(session)
            except SQLAlchemyError:
                logger.warning("Access: cannot read api_keys; requiring keys", exc_info=True)
                return True
            with self._lock:
                self._keys_configured = self._keys_configured or configured
                self._keys_checked_at = now
        return self._keys_configured

    @property
    def mode(self) -> AccessMode:
        return "open" if self.open_mode_allowed and not self.keys_configured() else "keys"

    def authenticate(self, key: str | None, *, local_request: bool) -> Principal:
        """The caller's principal; ``Unauthorized`` for a missing, unknown or revoked key."""
        if key is None:
            if self.mode == "open":
                if local_request:
                    return LOCAL_ADMIN
                raise Unauthorized(
                    "Open local mode serves only requests made on this machine; "
                    "send an API key (Authorization: Bearer <key>)."
                )
            raise Unauthorized("An API key is required (Authorization: Bearer <key>).")
        digest = api_keys.hash_key(key)
        now = self._clock()
        with self._lock:
            cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            with transaction(self._session_factory) as session:
                row = api_keys.verify_key(session, key)
                principal = (
                    Principal(
                        user_id=row.user_id,
                        role="admin" if row.role == "admin" else "user",
                        key_id=row.id,
                    )
                    if row is not None
                    else None
                )
        except SQLAlchemyError as exc:
            logger.warning("Access: cannot verify an API key", exc_info=True)
            raise ServiceUnavailable("API keys cannot be checked right now; retry.") from exc
        if principal is None:
            raise Unauthorized("Invalid or revoked API key.")
        with self._lock:
            self._keys_configured = True
            if len(self._cache) >= MAX_CACHED_KEYS:
                self._cache.clear()
            self._cache[digest] = (principal, now + self._cache_seconds)
        return principal

    def forget_cached_keys(self) -> None:
        """Drop every cached verification (after a revocation in this process)."""
        with self._lock:
            self._cache.clear()

    def note_key_issued(self) -> None:
        with self._lock:
            self._keys_configured = True


@dataclass
class AccessControl:
    """The request guards of one running service, built by ``start_access_control``."""

    authenticator: Authenticator
    submit_limiter: TokenBucketLimiter | None
    max_body_bytes: int
    metrics_token: str | None


def start_access_control(
    settings: Settings, session_factory: sessionmaker[Session]
) -> AccessControl:
    """Decide the access mode at start-up, say it in the log, refuse an exposed open service."""
    open_allowed = is_loopback(settings.bind_host)
    authenticator = Authenticator(session_factory, open_mode_allowed=open_allowed)
    if authenticator.keys_configured():
        logger.info(
            "Access: API keys required on every /api route (bound to %s)", settings.bind_host
        )
    elif open_allowed:
        logger.warning(
            "Access: OPEN LOCAL MODE - no API key exists, so every request made on this machine "
            "acts as the local administrator. Create a key to require keys: "
            "asa keys create --user NAME --admin"
        )
    else:
        raise InsecureStartupError(
            f"Refusing to start: BIND_HOST is {settings.bind_host!r}, not a loopback address, and "
            "no API key exists, so anyone who can reach the service could use it. Create a key "
            "first (asa keys create --user NAME --admin, with the same DATABASE_URL) or bind "
            "to 127.0.0.1."
        )
    if not open_allowed and settings.metrics_token is None:
        logger.warning(
            "Access: /metrics is readable by anyone who reaches %s; set METRICS_TOKEN to "
            "require a bearer token.",
            settings.bind_host,
        )
    limiter = None
    if settings.task_submit_rate_per_minute > 0:
        limiter = TokenBucketLimiter(
            settings.task_submit_rate_per_minute, settings.task_submit_burst
        )
    token = settings.metrics_token
    return AccessControl(
        authenticator=authenticator,
        submit_limiter=limiter,
        max_body_bytes=settings.max_request_body_bytes,
        metrics_token=token.get_secret_value() if token is not None else None,
    )


# -- dependencies -----------------------------------------------------------------------------

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="APIKey",
    description="An API key from `asa keys create` or POST /api/v1/admin/keys.",
)
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def get_access(request: Request) -> AccessControl:
    access: AccessControl = request.app.state.access
    return access


def _bearer_key(request: Request, credentials: HTTPAuthorizationCredentials | None) -> str | None:
    if credentials is None:
        if "authorization" in request.headers:
            raise Unauthorized("The Authorization header must read: Bearer <key>.")
        return None
    return credentials.credentials


def _is_local_request(request: Request) -> bool:
    client = request.client
    if client is None or not is_loopback(client.host):
        return False
    return not any(name in request.headers for name in _FORWARDING_HEADERS)


def current_principal(request: Request, credentials: Bearer) -> Principal:
    key = _bearer_key(request, credentials)
    return get_access(request).authenticator.authenticate(
        key, local_request=_is_local_request(request)
    )


def require_admin(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
    if not principal.is_admin:
        raise Forbidden("This endpoint is for administrators.")
    return principal


def access_mode(request: Request) -> AccessMode:
    return get_access(request).authenticator.mode


async def require_metrics_token(request: Request, credentials: Bearer) -> None:
    """With METRICS_TOKEN set, /metrics needs ``Authorization: Bearer <METRICS_TOKEN>``."""
    expected = get_access(request).metrics_token
    if expected is None:
        return
    key = _bearer_key(request, credentials)
    if key is None or not hmac.compare_digest(key.encode(), expected.encode()):
        raise Unauthorized("/metrics requires the METRICS_TOKEN bearer token.")


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
AdminPrincipal = Annotated[Principal, Depends(require_admin)]
AccessModeDep = Annotated[AccessMode, Depends(access_mode)]
