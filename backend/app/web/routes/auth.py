"""Sign in with an API key, sign out."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from app.access import api_keys
from app.api.auth import get_access
from app.core.errors import Unauthorized
from app.web import session as web_session
from app.web.render import ConsoleRoute, render, safe_next, see_other
from app.web.session import SignedInForm, SignInForm

router = APIRouter(route_class=ConsoleRoute)


def _signed_in(request: Request) -> bool:
    try:
        web_session.console_principal(request)
    except web_session.SignInRequired:
        return False
    return True


@router.get("/login")
def login_page(
    request: Request, next_url: Annotated[str, Query(alias="next", max_length=2000)] = "/"
) -> Response:
    if _signed_in(request):
        return see_other(safe_next(next_url))
    request.state.session_sid = ""
    return render(request, "login.html", _login_context(request, next_url, None))


@router.post("/login")
def login(request: Request, form: SignInForm) -> Response:
    next_url = safe_next(form.get("next", "/"))
    key = form.get("api_key", "").strip()
    try:
        principal = web_session.sign_in_with_key(request, key) if key else None
    except Unauthorized:
        principal = None
    if principal is None or principal.key_id is None:
        message = (
            "That is not a valid API key, or it has been revoked."
            if key
            else ("Enter your API key.")
        )
        return render(
            request, "login.html", _login_context(request, next_url, message), status_code=401
        )
    response = see_other(next_url)
    web_session.start_session(request, response, principal.key_id, api_keys.hash_key(key))
    return response


@router.post("/logout")
def logout(request: Request, _form: SignedInForm) -> Response:
    response = see_other("/login")
    web_session.end_session(request, response)
    return response


def _login_context(request: Request, next_url: str, error: str | None) -> dict[str, object]:
    return {
        "next_url": safe_next(next_url),
        "error": error,
        "open_mode": get_access(request).authenticator.mode == "open",
    }
