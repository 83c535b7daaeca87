"""Who is using the console, and whether a form really came from one of its pages.

The principal is resolved as the API resolves it, with the session cookie in place of the
``Authorization`` header:

- a session cookie (``app.web.security``) names an API key; on every request the key's row is
  read and the cookie's MAC checked against its hash, so a revoked key (or one whose row is
  gone) ends the session at once, whatever process revoked it;
- without a cookie, ``app.api.auth.current_principal`` decides exactly as for an API request
  with no key: the local administrator in open local mode, for a request made on this machine;
  otherwise the visitor must sign in;
- signing in verifies the key with the API's ``Authenticator``.

Every POST carries the page's CSRF token in its form (``csrf_token``), checked against the
browser's nonce cookie and the session; a request another site started (``Origin`` or
``Sec-Fetch-Site`` says so) is refused before that.
"""

from __future__ import annotations

import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request, Response
from sqlalchemy.exc import SQLAlchemyError

from app.access.principal import Principal
from app.api.auth import current_principal, get_access
from app.api.deps import get_app_runtime
from app.core.db import transaction
from app.core.errors import AppError, Forbidden, ServiceUnavailable, Unauthorized
from app.models import ApiKey
from app.web.cache import ClosedDaysCache
from app.web.security import ConsoleSigner, load_secret, new_nonce

SESSION_COOKIE = "asa_session"
NONCE_COOKIE = "asa_csrf"
CSRF_FIELD = "csrf_token"
MAX_FORM_FIELDS = 32
_FORM_TYPE = "application/x-www-form-urlencoded"
_state_lock = threading.Lock()


class SignInRequired(AppError):
    """No usable session: the console answers with its sign-in page."""

    status_code = 401
    code = "sign_in_required"


@dataclass(frozen=True, slots=True)
class ConsoleState:
    """The console's long-lived parts of one application: its signer, cookie policy and the
    figures of ended days it keeps."""

    signer: ConsoleSigner
    session_seconds: float
    secure_cookies: bool | None
    closed_days: ClosedDaysCache = field(default_factory=ClosedDaysCache)


def console_state(request: Request) -> ConsoleState:
    """Built on first use from the running service's settings (reads or creates the secret)."""
    state: ConsoleState | None = getattr(request.app.state, "console", None)
    if state is not None:
        return state
    with _state_lock:
        state = getattr(request.app.state, "console", None)
        if state is None:
            settings = get_app_runtime(request).settings
            secret = load_secret(settings.web_session_secret, settings.web_session_secret_file)
            state = ConsoleState(
                signer=ConsoleSigner(secret),
                session_seconds=settings.web_session_hours * 3600,
                secure_cookies=settings.web_cookie_secure,
            )
            request.app.state.console = state
    return state


# -- cookies -------------------------------------------------------------------------------------


def _secure(request: Request) -> bool:
    configured = console_state(request).secure_cookies
    return request.url.scheme == "https" if configured is None else configured


def set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    """HttpOnly (no script reads it), SameSite=Lax (no cross-site POST carries it)."""
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="lax",
        secure=_secure(request),
    )


def browser_nonce(request: Request) -> str:
    """The browser's CSRF nonce; a new one (set on the response by the route) when it has none."""
    nonce = getattr(request.state, "csrf_nonce", None)
    if nonce is None:
        nonce = request.cookies.get(NONCE_COOKIE) or ""
        if not 16 <= len(nonce) <= 64:
            nonce = new_nonce()
            request.state.new_csrf_nonce = nonce
        request.state.csrf_nonce = nonce
    return str(nonce)


def renew_nonce(request: Request) -> None:
    """A new nonce from this response on (at sign-in and sign-out)."""
    nonce = new_nonce()
    request.state.csrf_nonce = nonce
    request.state.new_csrf_nonce = nonce


def csrf_token(request: Request) -> str:
    """The token this page's forms must send back."""
    sid = getattr(request.state, "session_sid", "")
    return console_state(request).signer.csrf_token(browser_nonce(request), sid)


def start_session(request: Request, response: Response, key_id: str, key_hash: str) -> None:
    state = console_state(request)
    cookie = state.signer.session_cookie(key_id, key_hash, state.session_seconds)
    set_cookie(request, response, SESSION_COOKIE, cookie, int(state.session_seconds))
    renew_nonce(request)


def end_session(request: Request, response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax")
    renew_nonce(request)


# -- the principal -------------------------------------------------------------------------------


def console_principal(request: Request) -> Principal:
    """The signed-in principal, or the open mode's local administrator; ``SignInRequired``."""
    cookie = request.cookies.get(SESSION_COOKIE)
    request.state.session_sid = ""
    if cookie:
        principal = _session_principal(request, cookie)
        if principal is not None:
            request.state.principal = principal
            return principal
        request.state.session_ended = True  # the cookie is cleared on the way out
    try:
        principal = current_principal(request, None)
    except Unauthorized as exc:
        raise SignInRequired("Sign in with your API key.") from exc
    request.state.principal = principal
    return principal


def _session_principal(request: Request, cookie: str) -> Principal | None:
    signer = console_state(request).signer
    key_id = signer.claimed_key_id(cookie)
    if key_id is None:
        return None
    runtime = get_app_runtime(request)
    try:
        with transaction(runtime.session_factory) as session:
            row = session.get(ApiKey, key_id)
            live = row is not None and row.revoked_at is None
            key_hash, user_id, role = (row.key_hash, row.user_id, row.role) if row else ("", "", "")
    except SQLAlchemyError as exc:
        raise ServiceUnavailable("API keys cannot be checked right now; retry.") from exc
    claims = signer.verify_session(cookie, key_hash) if live else None
    if claims is None:
        return None
    request.state.session_sid = claims.sid
    return Principal(user_id=user_id, role="admin" if role == "admin" else "user", key_id=key_id)


def sign_in_with_key(request: Request, key: str) -> Principal:
    """Verify ``key`` as the API verifies a bearer key (``Unauthorized`` if it is not live)."""
    return get_access(request).authenticator.authenticate(key, local_request=False)


def require_admin(principal: Annotated[Principal, Depends(console_principal)]) -> Principal:
    if not principal.is_admin:
        raise Forbidden("This page is for administrators.")
    return principal


ConsolePrincipal = Annotated[Principal, Depends(console_principal)]
ConsoleAdmin = Annotated[Principal, Depends(require_admin)]


# -- forms ---------------------------------------------------------------------------------------


class CsrfRefused(AppError):
    status_code = 403
    code = "csrf"


def _same_origin(request: Request) -> bool:
    if request.headers.get("sec-fetch-site") == "cross-site":
        return False
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    parsed = urllib.parse.urlsplit(origin)
    return parsed.netloc == request.headers.get("host", "") and parsed.scheme in ("http", "https")


async def read_form(request: Request) -> dict[str, str]:
    """The url-encoded form, its CSRF token checked (``CsrfRefused``); first value of a field.

    Parsed here from the body (bounded by the service's body-size limit) rather than with
    python-multipart: the console posts only url-encoded forms.
    """
    if request.headers.get("content-type", "").split(";")[0].strip() != _FORM_TYPE:
        raise CsrfRefused("The console accepts only its own url-encoded forms.")
    if not _same_origin(request):
        raise CsrfRefused("This form was sent from another site.")
    try:
        pairs = urllib.parse.parse_qsl(
            (await request.body()).decode("utf-8"),
            keep_blank_values=True,
            max_num_fields=MAX_FORM_FIELDS,
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise CsrfRefused("The form could not be read.") from exc
    form: dict[str, str] = {}
    for name, value in pairs:
        form.setdefault(name, value)
    nonce = request.cookies.get(NONCE_COOKIE, "")
    sid = getattr(request.state, "session_sid", "")
    if not console_state(request).signer.csrf_valid(form.get(CSRF_FIELD, ""), nonce, sid):
        raise CsrfRefused(
            "The form's security token is missing or out of date (did you sign in or out in "
            "another tab?). Reload the page and submit it again."
        )
    return form


async def principal_form(
    request: Request, _principal: Annotated[Principal, Depends(console_principal)]
) -> dict[str, str]:
    """The form of a signed-in user (the session is resolved first: the token is bound to it)."""
    return await read_form(request)


async def anonymous_form(request: Request) -> dict[str, str]:
    return await read_form(request)


SignedInForm = Annotated[dict[str, str], Depends(principal_form)]
SignInForm = Annotated[dict[str, str], Depends(anonymous_form)]
