"""The one choke point: what ``redact`` masks, and that logs and spans go through it."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

from app.core.redaction import MASK, install_log_redaction, redact, safe_error_message
from app.core.span_redaction import RedactingSpanExporter

CONFIGURED = "configured-secret-4242"


@pytest.mark.parametrize(
    "text",
    [
        "key sk-proj-abcdefghijklmnop in a message",
        "ours: asa_0123456789ab_SECRETSECRETSECRET",
        "Authorization: Bearer abc.def-ghi",
        '{"api_key": "hunter2hunter2"}',
        "password=hunter2hunter2",
        "postgresql+psycopg://asa:hunter2hunter2@db:5432/asa",
    ],
)
def test_credential_shapes_are_masked(text: str) -> None:
    redacted = redact(text)
    assert MASK in redacted
    for secret in ("abcdefghijklmnop", "SECRETSECRETSECRET", "abc.def-ghi", "hunter2hunter2"):
        assert secret not in redacted


def test_configured_secrets_are_masked_whole_longest_first() -> None:
    text = f"a={CONFIGURED} b={CONFIGURED}-extended"

    redacted = redact(text, [CONFIGURED, f"{CONFIGURED}-extended", "", "abc"])

    assert CONFIGURED not in redacted and redacted.count(MASK) == 2
    assert redact("abc is short", ["abc"]) == "abc is short"  # too short to be a secret


def test_safe_error_messages_are_redacted_and_bounded() -> None:
    message = safe_error_message(RuntimeError(f"{CONFIGURED} " + "x" * 5000), [CONFIGURED])

    assert CONFIGURED not in message and len(message) < 2100
    assert message.endswith("[truncated]")


@pytest.fixture
def redacted_logs() -> Iterator[None]:
    uninstall = install_log_redaction([CONFIGURED])
    yield
    uninstall()


@pytest.mark.usefixtures("redacted_logs")
def test_every_log_record_is_redacted_whoever_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    logging.getLogger("some.library.deep.down").debug("token is %s", CONFIGURED)
    logging.getLogger("app.x").info("headers %s", {"Authorization": "Bearer abc123def456"})
    try:
        raise ValueError(f"rejected {CONFIGURED}")
    except ValueError:
        logging.getLogger("app.y").exception("call failed")

    assert CONFIGURED not in caplog.text and "abc123def456" not in caplog.text
    assert caplog.text.count(MASK) >= 3
    assert "ValueError: rejected [REDACTED]" in caplog.text  # the traceback too


def test_uninstalling_restores_plain_records(caplog: pytest.LogCaptureFixture) -> None:
    uninstall = install_log_redaction([CONFIGURED])
    uninstall()

    logging.getLogger("app.z").warning("token is %s", CONFIGURED)

    assert CONFIGURED in caplog.text


def test_exported_spans_are_redacted() -> None:
    inner = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(RedactingSpanExporter(inner, [CONFIGURED])))
    tracer = provider.get_tracer("test")

    with tracer.start_as_current_span(f"GET /x/{CONFIGURED}") as span:
        span.set_attribute("url.path", f"/x/{CONFIGURED}")
        span.set_attribute("tags", ["a", f"b {CONFIGURED}"])
        span.add_event("exception", {"exception.message": "Bearer abcdefghijkl rejected"})
        span.set_status(Status(StatusCode.ERROR, f"failed with {CONFIGURED}"))
    with tracer.start_as_current_span("clean") as span:
        span.set_attribute("n", 1)

    dirty, clean = inner.get_finished_spans()
    assert CONFIGURED not in dirty.to_json() and "abcdefghijkl" not in dirty.to_json()
    assert dirty.attributes is not None and dirty.attributes["url.path"] == f"/x/{MASK}"
    assert dirty.status.status_code is StatusCode.ERROR
    assert dirty.context is not None and dirty.context.is_valid and dirty.end_time is not None
    assert clean.name == "clean" and clean.attributes is not None and clean.attributes["n"] == 1


@pytest.mark.usefixtures("redacted_logs")
def test_records_keep_their_arguments_for_formatters_that_read_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # uvicorn's access formatter unpacks record.args as (client, method, path, version, status).
    logging.getLogger("uvicorn.access").warning(
        '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", f"/x/{CONFIGURED}", "1.1", 200
    )
    logging.getLogger("app.split").warning("Bearer %s", "abcdefghijklmnop")

    access, split = caplog.records[-2:]
    assert isinstance(access.args, tuple) and len(access.args) == 5
    assert access.args[2] == f"/x/{MASK}" and access.args[4] == 200
    assert split.getMessage() == f"Bearer {MASK}"
