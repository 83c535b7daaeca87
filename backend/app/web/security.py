"""The console's signatures: the deployment's secret, session cookies and CSRF tokens.

A session cookie never holds an API key. It reads ``<payload>.<mac>``: ``payload`` is the
base64url JSON ``{"kid": <api key id>, "sid": <random>, "exp": <unix seconds>}`` and ``mac`` is
HMAC-SHA256 under the deployment's secret over the payload *and the key's stored hash*
(``api_keys.key_hash``), so a cookie can only be made by this service, for a key that was
presented to it, and says nothing a script could use as a key. Whether the key still works
(revocation) is checked on every request by the caller (``app.web.session``).

CSRF tokens are bound to the browser and the session: HMAC over a random per-browser nonce
(an HttpOnly cookie, renewed at sign-in and sign-out) and the session's ``sid``. A page embeds
the token in every form; a POST without the right one is refused.

The secret is ``WEB_SESSION_SECRET`` or, unset, 256 random bits generated once and kept in
``WEB_SESSION_SECRET_FILE`` (mode 0600, created atomically so that processes sharing the file
agree on one value). Hand-written on ``hmac``: it is a dozen lines, and the signing libraries
(itsdangerous) would add a dependency without removing any of the decisions above.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

logger = logging.getLogger(__name__)
MIN_SECRET_CHARS = 32
_MAX_COOKIE_CHARS = 1024


class SecretFileError(RuntimeError):
    """The secret file exists but does not hold a usable secret."""


def load_secret(configured: SecretStr | None, path: Path) -> bytes:
    """The configured secret, else the one in ``path``, created there on first use."""
    if configured is not None:
        value = configured.get_secret_value().strip()
        if len(value) < MIN_SECRET_CHARS:
            raise SecretFileError(f"WEB_SESSION_SECRET must be at least {MIN_SECRET_CHARS} chars")
        return value.encode()
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(staging, path)  # atomic: fails if another process created it first
            logger.info("Web console: generated a session secret in %s", path)
        except FileExistsError:
            pass
    finally:
        staging.unlink(missing_ok=True)
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("Web console: %s is readable by other users; chmod 600 it", path)
    value = path.read_text().strip()
    if len(value) < MIN_SECRET_CHARS:
        raise SecretFileError(
            f"{path} does not hold a session secret (at least {MIN_SECRET_CHARS} characters); "
            "delete it to have a new one generated (every console session then ends)."
        )
    return value.encode()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class SessionClaims:
    """What a session cookie says, once its MAC is checked against the key's hash."""

    key_id: str
    sid: str
    expires_at: int


class ConsoleSigner:
    """Makes and checks session cookies and CSRF tokens under one secret."""

    def __init__(self, secret: bytes, *, clock: Callable[[], float] = time.time) -> None:
        self._secret = hashlib.sha256(b"asa-web-console\0" + secret).digest()
        self._time = clock

    def _mac(self, *parts: str) -> str:
        message = "\0".join(parts).encode()
        return _b64(hmac.new(self._secret, message, hashlib.sha256).digest())

    def session_cookie(self, key_id: str, key_hash: str, lifetime_seconds: float) -> str:
        claims = {
            "kid": key_id,
            "sid": secrets.token_urlsafe(16),
            "exp": int(self._time() + lifetime_seconds),
        }
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{payload}.{self._mac('session', payload, key_hash)}"

    @staticmethod
    def claimed_key_id(cookie: str) -> str | None:
        """The key id a cookie names, *unverified*: which row to read its hash from."""
        claims = _claims(cookie)
        return claims.key_id if claims else None

    def verify_session(self, cookie: str, key_hash: str) -> SessionClaims | None:
        """The claims if the cookie was signed here for the key with ``key_hash`` and has not
        expired; else None."""
        claims = _claims(cookie)
        if claims is None:
            return None
        payload, mac = cookie.split(".", 1)
        if not hmac.compare_digest(mac, self._mac("session", payload, key_hash)):
            return None
        if claims.expires_at <= self._time():
            return None
        return claims

    def csrf_token(self, nonce: str, sid: str) -> str:
        return self._mac("csrf", nonce, sid)

    def csrf_valid(self, token: str, nonce: str, sid: str) -> bool:
        return bool(nonce) and hmac.compare_digest(token, self.csrf_token(nonce, sid))


def _claims(cookie: str) -> SessionClaims | None:
    if len(cookie) > _MAX_COOKIE_CHARS or cookie.count(".") != 1:
        return None
    payload = cookie.split(".", 1)[0]
    try:
        data = json.loads(_unb64(payload))
    except (ValueError, binascii.Error):
        return None
    if not isinstance(data, dict):
        return None
    kid, sid, exp = data.get("kid"), data.get("sid"), data.get("exp")
    if not (isinstance(kid, str) and isinstance(sid, str) and isinstance(exp, int)):
        return None
    return SessionClaims(key_id=kid, sid=sid, expires_at=exp)


def new_nonce() -> str:
    return secrets.token_urlsafe(24)
