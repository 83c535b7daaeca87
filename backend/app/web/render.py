"""Rendering: the Jinja2 environment and its filters, the console's response headers, and the
route class that turns expected errors into pages.

Every console response carries ``Content-Security-Policy: default-src 'self'`` (scripts,
styles, images and connections from this origin only; no inline script or style anywhere),
is never cached (pages show private data) and cannot be framed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from markupsafe import Markup

from app.core.errors import AppError
from app.core.redaction import redact
from app.web import session as web_session

logger = logging.getLogger(__name__)
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_PATH = "/static"

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def usd(value: Decimal | int | None) -> str:
    """Exact dollars: every digit of the decimal, fixed-point (``$0.000001275``)."""
    if value is None:
        return "—"
    return f"${format(Decimal(value), 'f')}"


def count(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def milliseconds(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f} ms" if value >= 10 else f"{value:,.1f} ms"


def duration(value: timedelta | None) -> str:
    if value is None:
        return "—"
    seconds = max(0, int(value.total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def utc(value: datetime | None) -> datetime | None:
    """Aware UTC (SQLite gives naive datetimes that are UTC)."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def when(value: datetime | None) -> Markup:
    """A ``<time>`` in UTC that the page's script shows in the viewer's time zone."""
    moment = utc(value)
    if moment is None:
        return Markup("—")
    iso = moment.isoformat(timespec="seconds").replace("+00:00", "Z")
    shown = moment.strftime("%Y-%m-%d %H:%M:%S UTC")
    return Markup('<time datetime="{}" data-local>{}</time>').format(iso, shown)


def percent(part: int, whole: int) -> str:
    return "—" if not whole else f"{100 * part / whole:.1f} %"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        usd=usd, count=count, ms=milliseconds, duration=duration, when=when, urlq=quote
    )
    env.globals.update(static=STATIC_PATH, percent=percent, urlencode=urlencode)
    return env


TEMPLATES = _environment()


def render(
    request: Request, template: str, context: dict[str, Any], *, status_code: int = 200
) -> HTMLResponse:
    """A page or a fragment (a template whose name starts with ``_``)."""
    principal = getattr(request.state, "principal", None)
    html = TEMPLATES.get_template(template).render(
        request=request,
        principal=principal,
        csrf_token=web_session.csrf_token(request),
        csrf_field=web_session.CSRF_FIELD,
        path=request.url.path,
        **context,
    )
    return HTMLResponse(html, status_code=status_code)


def see_other(url: str) -> RedirectResponse:
    """Post/redirect/get."""
    return RedirectResponse(url, status_code=303)


def safe_next(path: str) -> str:
    """Only a path of this site (no scheme, no host, no ``//``) is followed after sign-in."""
    if not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path


def sign_in_redirect(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    login = "/login?" + urlencode({"next": safe_next(target)})
    if request.headers.get("hx-request") == "true" or "text/event-stream" in request.headers.get(
        "accept", ""
    ):
        return Response(status_code=401, headers={"HX-Redirect": login})
    return see_other(login)


class ConsoleRoute(APIRoute):
    """A console route: sign-in redirects, expected errors as pages, the console's headers.

    Handlers do their database work in ``app.api.deps.get_session`` units of work that are
    closed before an error reaches this wrapper, so a rendered error never commits half a
    change.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def console_handler(request: Request) -> Response:
            web_session.browser_nonce(request)
            try:
                response = await handler(request)
            except web_session.SignInRequired:
                response = sign_in_redirect(request)
                request.state.session_ended = True
            except AppError as exc:
                response = error_page(request, exc.status_code, exc.detail)
            except RequestValidationError as exc:
                fields = ", ".join(
                    str(e.get("loc", ("?",))[-1]) for e in exc.errors() if isinstance(e, dict)
                )
                response = error_page(request, 422, f"Not a valid value: {fields}.")
            return _finish(request, response)

        return console_handler


def error_page(request: Request, status_code: int, message: str) -> Response:
    if request.headers.get("hx-request") == "true":
        return Response(redact(message), status_code=status_code, media_type="text/plain")
    return render(
        request, "error.html", {"status_code": status_code, "message": redact(message)},
        status_code=status_code,
    )  # fmt: skip


def _finish(request: Request, response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    new_nonce = getattr(request.state, "new_csrf_nonce", None)
    if new_nonce is not None:
        web_session.set_cookie(request, response, web_session.NONCE_COOKIE, new_nonce, 86400 * 30)
    if getattr(request.state, "session_ended", False) and web_session.SESSION_COOKIE in (
        request.cookies
    ):
        response.delete_cookie(web_session.SESSION_COOKIE, path="/", httponly=True, samesite="lax")
    return response
