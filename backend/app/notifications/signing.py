"""The webhook signature: HMAC-SHA256 over the timestamp and the body, as Stripe and Svix do.

A webhook request carries three headers:

- ``ASA-Event-Id``: the event's id (deliveries are at least once: deduplicate on it);
- ``ASA-Timestamp``: when this attempt was signed, in Unix seconds;
- ``ASA-Signature``: ``v1=<hex>``, the HMAC-SHA256 under the channel's signing secret of
  ``<timestamp>.<body>`` (the exact bytes received).

A receiver recomputes the signature with ``hmac.compare_digest`` and rejects a timestamp older
than a few minutes: a captured request cannot be replayed later, and the body cannot be changed
without the secret. ``verify`` is that check, for Python receivers (and our tests).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

EVENT_ID_HEADER = "ASA-Event-Id"
TIMESTAMP_HEADER = "ASA-Timestamp"
SIGNATURE_HEADER = "ASA-Signature"
SCHEME = "v1"
DEFAULT_TOLERANCE_SECONDS = 300
SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix, not a secret)


def new_signing_secret() -> str:
    """256 random bits, shown once when the channel is created."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"{SCHEME}={mac.hexdigest()}"


def signed_headers(
    secret: str, event_id: str, body: bytes, now: float | None = None
) -> dict[str, str]:
    timestamp = int(time.time() if now is None else now)
    return {
        EVENT_ID_HEADER: event_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: signature(secret, timestamp, body),
    }


def verify(
    secret: str,
    timestamp_header: str | None,
    signature_header: str | None,
    body: bytes,
    *,
    tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> bool:
    """True when the signature is the secret's over this body and the timestamp is recent."""
    if not timestamp_header or not signature_header:
        return False
    try:
        timestamp = int(timestamp_header)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_seconds:
        return False
    expected = signature(secret, timestamp, body)
    # Several signatures may be sent (a secret being rotated): any one valid is enough.
    candidates = [part.strip() for part in signature_header.split(",")]
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)
