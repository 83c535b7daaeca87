"""Spans leave the process redacted: an exporter wrapper applying ``app.core.redaction.redact``.

Our own LLM spans carry only ids, counts and an already redacted error message; the wrapper is
there for what auto-instrumentation and exception events add (``exception.message``,
``exception.stacktrace``, URLs), whose text we do not control.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import Status

from app.core.redaction import redact


class RedactingSpanExporter(SpanExporter):
    """Exports through ``inner`` each span with secrets masked in its name, attributes, event
    attributes and status description; spans with nothing to mask pass unchanged."""

    def __init__(self, inner: SpanExporter, secrets: Sequence[str] = ()) -> None:
        self.inner = inner
        self.secrets = tuple(secrets)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self.inner.export([self._redacted(span) for span in spans])

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def _text(self, value: str) -> str:
        return redact(value, self.secrets)

    def _value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._text(value)
        if isinstance(value, tuple | list):
            return type(value)(self._value(v) for v in value)
        return value

    def _attributes(self, attributes: Mapping[str, Any] | None) -> dict[str, Any]:
        return {key: self._value(value) for key, value in (attributes or {}).items()}

    def _redacted(self, span: ReadableSpan) -> ReadableSpan:
        attributes = self._attributes(span.attributes)
        events = [
            Event(event.name, self._attributes(event.attributes), event.timestamp)
            for event in span.events
        ]
        status = span.status
        description = status.description
        name = self._text(span.name)
        changed = (
            name != span.name
            or attributes != dict(span.attributes or {})
            or any(
                new.attributes != dict(old.attributes or {})
                for new, old in zip(events, span.events, strict=True)
            )
            or (description is not None and self._text(description) != description)
        )
        if not changed:
            return span
        if description is not None:
            status = Status(status.status_code, self._text(description))
        return ReadableSpan(
            name=name,
            context=span.context,
            parent=span.parent,
            resource=span.resource,
            attributes=attributes,
            events=events,
            links=span.links,
            kind=span.kind,
            status=status,
            start_time=span.start_time,
            end_time=span.end_time,
            instrumentation_scope=span.instrumentation_scope,
        )
