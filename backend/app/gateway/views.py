"""Reading upstream JSON with the tracking core's readers.

The tracking core reads the SDK's objects by attribute (``response.usage.prompt_tokens``,
``chunk.choices[0].delta.content``), duck-typed on purpose. ``JsonView`` gives a parsed JSON
object the same face without building the SDK's pydantic models (which would cost more than the
rest of the gateway's hot path): a missing key reads as None, as an optional SDK field does.
"""

from __future__ import annotations

import json
from typing import Any


class JsonView:
    """Attribute access over a JSON object; nested objects and lists are wrapped on access."""

    __slots__ = ("_data",)

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return wrap(self._data.get(name))

    @property
    def output_text(self) -> str:
        """A Responses API response's text, as the SDK's ``Response.output_text`` reads it."""
        parts: list[str] = []
        for item in self._data.get("output") or []:
            if isinstance(item, dict) and item.get("type") == "message":
                for content in item.get("content") or []:
                    if isinstance(content, dict) and content.get("type") == "output_text":
                        parts.append(str(content.get("text") or ""))
        return "".join(parts)


def wrap(value: Any) -> Any:
    if isinstance(value, dict):
        return JsonView(value)
    if isinstance(value, list):
        return [wrap(item) for item in value]
    return value


def parse_object(data: bytes) -> dict[str, Any] | None:
    """A JSON object from ``data``, or None when it is not one."""
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class SseSplitter:
    """Splits a byte stream into server-sent events (each ending with a blank line)."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        """The complete events in ``data`` (with what came before), each with its blank line."""
        buffer = self._buffer + data
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        events: list[bytes] = []
        start = 0
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            events.append(buffer[start : end + 2])
            start = end + 2
        self._buffer = buffer[start:]
        return events

    def rest(self) -> bytes:
        """What is left after the last complete event (a stream cut mid-event)."""
        rest, self._buffer = self._buffer, b""
        return rest


def event_data(event: bytes) -> bytes | None:
    """The ``data`` of one event (its data lines joined), or None when it has none."""
    lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(lines)
