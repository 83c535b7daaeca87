"""One choke point for masking secrets in text that leaves the process (rows, spans, logs).

``redact`` is the rule; everything that lets text out goes through it: the error handler (HTTP
bodies), ``safe_error_message`` (``llm_usage.error_message`` and LLM span status), the log
record factory installed by ``install_log_redaction`` (every log line) and
``app.core.span_redaction`` (every exported span).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

MASK = "[REDACTED]"
_PATTERNS = (
    re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}"),  # OpenAI-style keys, project keys included
    re.compile(r"\basa_[A-Za-z0-9_\-]{8,}"),  # our own API keys
    re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/\-]+=*"),
    re.compile(
        r"(?i)(\"?(?:api[_-]?key|authorization|password|secret|token)\"?\s*[:=]\s*\"?)[^\s\",}]+"
    ),
    re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^/\s:@]*:)[^@\s/]+(?=@)"),  # user:password@ in URLs
)
MAX_MESSAGE_CHARS = 2000
MIN_SECRET_CHARS = 4


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with known secrets and anything shaped like a credential masked."""
    # Longest first, so a secret that contains another is masked whole.
    for secret in sorted({s for s in secrets if s and len(s) >= MIN_SECRET_CHARS}, key=len)[::-1]:
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


# -- logs -------------------------------------------------------------------------------------

_exception_formatter = logging.Formatter()


def redact_log_record(record: logging.LogRecord, secrets: Iterable[str] = ()) -> None:
    """Mask secrets in ``record``'s message, traceback and stack, in place.

    The arguments are masked one by one, so formatters that read ``record.args`` (uvicorn's
    access log does) keep working; only when that is not enough (a secret split between the
    template and an argument) is the record flattened to its masked message.
    """
    try:
        message = record.getMessage()
    except Exception:  # a malformed record: the handler reports it as it always does
        return
    if redact(message, secrets) != message:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg, secrets)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_arg(arg, secrets) for arg in record.args)
        elif isinstance(record.args, Mapping):
            record.args = {k: _redact_arg(v, secrets) for k, v in record.args.items()}
        try:
            again: str | None = record.getMessage()
        except Exception:
            again = None
        if again is None or redact(again, secrets) != again:
            record.msg, record.args = redact(message, secrets), None
    if record.exc_info and not record.exc_text:
        # Formatters reuse a cached exc_text, so the traceback they print is this one.
        record.exc_text = redact(_exception_formatter.formatException(record.exc_info), secrets)
    if record.stack_info:
        record.stack_info = redact(record.stack_info, secrets)


def _redact_arg(arg: Any, secrets: Iterable[str]) -> Any:
    if arg is None or isinstance(arg, bool | int | float):
        return arg
    text = arg if isinstance(arg, str) else str(arg)
    cleaned = redact(text, secrets)
    return arg if cleaned == text else cleaned


class _RedactingRecordFactory:
    """Wraps the process's log record factory so that every record is redacted once, at birth.

    A factory rather than a ``logging.Filter``: a filter on the root logger never sees records
    that child loggers propagate to its handlers, and a filter on handlers misses handlers added
    later (uvicorn's, a test's); every record, whoever logs it and wherever it goes, is made by
    the factory.
    """

    def __init__(self, previous: Callable[..., logging.LogRecord], secrets: tuple[str, ...]):
        self.previous = previous
        self.secrets = secrets
        self.active = True

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.previous(*args, **kwargs)
        if self.active:
            redact_log_record(record, self.secrets)
        return record


def install_log_redaction(secrets: Iterable[str] = ()) -> Callable[[], None]:
    """Redact every log record of this process from now on; returns the function that undoes
    it (safe to call in any order when several are installed)."""
    factory = _RedactingRecordFactory(logging.getLogRecordFactory(), tuple(secrets))
    logging.setLogRecordFactory(factory)

    def uninstall() -> None:
        factory.active = False
        if logging.getLogRecordFactory() is factory:
            logging.setLogRecordFactory(factory.previous)

    return uninstall
