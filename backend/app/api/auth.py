"""Who is calling: the principal every router depends on.

Requests authenticate with ``Authorization: Bearer <key>`` (keys: ``app.access.api_keys``).
Until the first key is issued the service runs in open local mode: a request without a key acts
as the local administrator, but only while the server is bound to a loopback address and only
for a request that comes from this machine directly (not through a forwarding proxy). Once a
key exists, every ``/api`` route requires a valid one; revoking every key does not reopen the
service. A server bound elsewhere without any key refuses to start.

"Bound to a loopback address" is checked twice: ``BIND_HOST`` at start-up, and the sockets the
process actually listens on (``listening_addresses``), at start-up and again, at most once a
second, while open mode serves requests: the server binds its socket after the application has
started, so ``uvicorn --host 0.0.0.0`` run directly is caught by the second check, which then
refuses every keyless request.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import math
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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
from app.core.rate_limit import RateLimiter, submit_rate_limiter

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


def listening_addresses() -> list[str] | None:
    """The local addresses of every TCP socket this process listens on; None when the process's
    descriptors cannot be listed (then nothing is known to be safe)."""
    fd_dir = Path("/proc/self/fd") if Path("/proc/self/fd").is_dir() else Path("/dev/fd")
    try:
        descriptors = [int(name) for name in os.listdir(fd_dir) if name.isdigit()]
    except OSError:
        return None
    accepting = getattr(socket, "SO_ACCEPTCONN", None)
    # A socket object built on a descriptor changes nothing about it, unless a default timeout
    # is set (it would make the descriptor non-blocking): then we do not look.
    if accepting is None or socket.getdefaulttimeout() is not None:
        return None
    found: list[str] = []
    for fd in descriptors:
        with contextlib.suppress(OSError):  # closed meanwhile, or not a socket after all
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=fd)  # borrowed: detached below, never closed here
            try:
                if (
                    sock.family in (socket.AF_INET, socket.AF_INET6)
                    and sock.type == socket.SOCK_STREAM
                    and sock.getsockopt(socket.SOL_SOCKET, accepting)
                ):
                    found.append(str(sock.getsockname()[0]))
            finally:
                sock.detach()
    return found


def exposed_listeners() -> list[str]:
    """The addresses this process listens on that are not loopback (``["?"]`` when unknown)."""
    addresses = listening_addresses()
    if addresses is None:
        return ["?"]
    return sorted({address for address in addresses if not is_loopback(address)})


class Authenticator:
    """Resolves a bearer key to a principal, with a short in-memory cache."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        open_mode_allowed: bool,
        cache_seconds: float = AUTH_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        exposed: Callable[[], list[str]] = exposed_listeners,
    ) -> None:
        self._session_factory = session_factory
        self.open_mode_allowed = open_mode_allowed
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._keys_configured = False
        self._keys_checked_at = -math.inf
        self._exposed = exposed
        self._exposed_now: list[str] = []
        self._exposed_checked_at = -math.inf
        self._checked_while_serving = False

    def exposed_addresses(self, *, serving: bool = True) -> list[str]:
        """Non-loopback addresses the process listens on (re-read at most once per cache time).

        Once one is seen, open mode stays off for the life of the process. ``serving=False`` is
        the start-up check, made before the server binds its own sockets: it never stands in for
        the first check made while serving, which sees every socket the server listens on.
        """
        if self._exposed_now:
            return self._exposed_now
        now = self._clock()
        due = now - self._exposed_checked_at >= self._cache_seconds
        if not serving or not self._checked_while_serving or due:
            exposed = self._exposed()
            with self._lock:
                if serving:
                    self._checked_while_serving = True
                    self._exposed_checked_at = now
                if exposed and not self._exposed_now:
                    self._exposed_now = exposed
                    logger.error(
                        "Access: open local mode is OFF - this process listens on %s, not only "
                        "on loopback, and no API key exists: every request without a key is "
                        "refused. Create a key (asa keys create --user NAME --admin) or bind "
                        "to 127.0.0.1.",
                        ", ".join(exposed),
                    )
        return self._exposed_now

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
        if not self.open_mode_allowed or self.keys_configured():
            return "keys"
        return "keys" if self.exposed_addresses() else "open"

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
            if self._exposed_now and not self.keys_configured():
                raise Unauthorized(
                    "Open local mode is off: this server listens on an address other machines "
                    "can reach. Create an API key (asa keys create --user NAME --admin) and "
                    "send it (Authorization: Bearer <key>), or bind to 127.0.0.1."
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
    submit_limiter: RateLimiter | None
    max_body_bytes: int
    metrics_token: str | None


def start_access_control(
    settings: Settings,
    session_factory: sessionmaker[Session],
    *,
    exposed: Callable[[], list[str]] = exposed_listeners,
) -> AccessControl:
    """Decide the access mode at start-up, say it in the log, refuse an exposed open service.

    ``exposed`` lists the non-loopback addresses the process listens on (see the module
    docstring); the default reads the process's own sockets.
    """
    open_allowed = is_loopback(settings.bind_host)
    authenticator = Authenticator(session_factory, open_mode_allowed=open_allowed, exposed=exposed)
    if open_allowed and not authenticator.keys_configured():
        listening = authenticator.exposed_addresses(serving=False)
        if listening:
            raise InsecureStartupError(
                f"Refusing to start: this process listens on {', '.join(listening)}, not only on "
                "loopback, and no API key exists, so anyone who can reach the service could use "
                "it. Create a key first (asa keys create --user NAME --admin, with the same "
                "DATABASE_URL) or bind to 127.0.0.1."
            )
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
    limiter = submit_rate_limiter(settings, session_factory)
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
