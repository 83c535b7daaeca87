"""One choke point for masking secrets in text that leaves the process (rows, spans, logs)."""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "[REDACTED]"
_PATTERNS = (
    re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}"),  # OpenAI-style keys, project keys included
    re.compile(r"\basa_[A-Za-z0-9_\-]{8,}"),  # our own API keys
    re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/\-]+=*"),
    re.compile(
        r"(?i)(\"?(?:api[_-]?key|authorization|password|secret|token)\"?\s*[:=]\s*\"?)[^\s\",}]+"
    ),
)
MAX_MESSAGE_CHARS = 2000


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with known secrets and anything shaped like a credential masked."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, MASK)
    for pattern in _PATTERNS:
        if pattern.groups:
            text = pattern.sub(lambda m: m.group(1) + MASK, text)
        else:
            text = pattern.sub(MASK, text)
    return text


def safe_error_message(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """A bounded, redacted description of ``exc`` fit to store and show."""
    text = redact(str(exc) or type(exc).__name__, secrets)
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[:MAX_MESSAGE_CHARS] + "...[truncated]"
    return text
