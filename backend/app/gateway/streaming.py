"""A streamed gateway call: the upstream's server-sent events passed on as they arrive.

Each read from the upstream is split into complete events and sent on at once (nothing is held
back beyond an event's own bytes). Every event's JSON is shown to the tracking core's stream
state (``ChatStreamState`` / ``ResponsesStreamState``), which keeps the usage, model and finish
reasons for the row. The chat usage chunk the gateway asked for on the client's behalf is not
sent on; when the client asked for it, it gets it with an ``asa`` object added: the call's
``request_id``, ``cost_usd`` and, where a limit applies, ``budget_remaining_usd`` and
``budget_scope`` (the row is written just before it is sent).

A client that goes away cancels the upstream request (its connection is closed) and leaves a
partial row (``is_partial``, flag ``stream_closed_early``) with the tokens known so far; an
upstream that drops the stream leaves an error row, partial when content had arrived.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import aiohttp
import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.gateway.proxy import (
    REMAINING_HEADER,
    REQUEST_ID_HEADER,
    SCOPE_HEADER,
    Call,
    Gateway,
    UpstreamError,
    finish,
)
from app.gateway.routing import Target
from app.gateway.views import JsonView, SseSplitter, event_data, parse_object
from app.tracking.streams import StreamState
from app.tracking.tracker import Outcome, complete_shielded

logger = logging.getLogger(__name__)
_DONE = b"[DONE]"


class StreamedCall(Response):
    """The ASGI response of one streamed call; it owns the upstream response."""

    def __init__(
        self, gateway: Gateway, call: Call, response: aiohttp.ClientResponse, target: Target
    ) -> None:
        assert call.api.new_state is not None
        super().__init__(status_code=response.status)
        self.gateway = gateway
        self.call = call
        self.response = response
        self.flags = (f"upstream:{target.upstream.name}",)
        self.state: StreamState = call.api.new_state()
        self.splitter = SseSplitter()
        self.disconnected = False
        self.broken = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracker = self.call.tracker
        headers = [
            (b"content-type", self.response.headers.get("content-type", "text/event-stream")),
            (b"cache-control", b"no-cache"),
            (REQUEST_ID_HEADER.encode(), tracker.request_id.encode()),
        ]
        try:
            await self._send(
                send,
                {
                    "type": "http.response.start",
                    "status": self.response.status,
                    "headers": [(k, v.encode() if isinstance(v, str) else v) for k, v in headers],
                },
            )
            async with anyio.create_task_group() as group:

                async def watch() -> None:
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            self.disconnected = True
                            group.cancel_scope.cancel()
                            return

                group.start_soon(watch)
                if not self.disconnected:
                    await self._pump(send)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                finish(self.response)  # closes the upstream connection if cut short
                if not tracker.finished:
                    await self._complete(self._closed_early_outcome())
        if not self.disconnected and not self.broken:
            await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})

    async def _send(self, send: Send, message: dict[str, Any]) -> bool:
        """Send to the client; False (and the call marked disconnected) if it went away."""
        try:
            await send(message)
        except OSError:  # how the server says the client is gone (ClientDisconnected)
            self.disconnected = True
            return False
        return True

    async def _pump(self, send: Send) -> None:
        tracker = self.call.tracker
        first = True
        try:
            async for data in self.response.content.iter_any():
                if first:
                    tracker.first_chunk_at = time.perf_counter()
                    first = False
                out = [await self._pass(event) for event in self.splitter.feed(data)]
                body = b"".join(out)
                if body and not await self._send(
                    send, {"type": "http.response.body", "body": body, "more_body": True}
                ):
                    return  # the partial row is written by the caller's ``finally``
        except (aiohttp.ClientError, TimeoutError) as exc:
            await self._complete(self._dropped_outcome(exc))
            # The client's stream breaks off too (the response is left incomplete, the server
            # closes the connection): it must not read a cut stream as a finished one.
            self.broken = True
            return
        rest = self.splitter.rest()
        if rest:  # an event cut off by the end of the stream: passed on as it came
            await self._send(send, {"type": "http.response.body", "body": rest, "more_body": True})
        outcome = tracker.outcome(
            tracker.success_outcome, self.state.fields(), extra_flags=self.flags
        )
        await self._complete(outcome)

    async def _pass(self, event: bytes) -> bytes:
        """The bytes to send on for one upstream event (empty: hold it back)."""
        data = event_data(event)
        if data is None or data == _DONE:
            return event
        parsed = parse_object(data)
        if parsed is None:
            return event
        try:
            self.state.see(JsonView(parsed))
        except Exception:  # an odd chunk: accounting reads what it can, the client gets it all
            logger.debug("An upstream event the stream state could not read", exc_info=True)
        if not self.call.api.is_chat or not parsed.get("usage") or parsed.get("choices"):
            return event
        # The usage chunk: the call is complete; the row is written before it is sent on.
        tracker = self.call.tracker
        outcome = tracker.outcome(
            tracker.success_outcome, self.state.fields(), extra_flags=self.flags
        )
        await self._complete(outcome)
        if not self.call.wants_usage:
            return b""
        parsed["asa"] = await self._accounting(outcome)
        return b"data: " + json.dumps(parsed, separators=(",", ":")).encode() + b"\n\n"

    async def _accounting(self, outcome: Outcome | None) -> dict[str, Any]:
        info: dict[str, Any] = {"request_id": self.call.tracker.request_id}
        if outcome is not None:
            info["cost_usd"] = format(outcome.record.cost_usd, "f")
        remaining = await self.gateway.remaining_headers(self.call)
        if remaining:
            info["budget_remaining_usd"] = remaining[REMAINING_HEADER]
            info["budget_scope"] = remaining[SCOPE_HEADER]
        return info

    def _closed_early_outcome(self) -> Outcome | None:
        tracker = self.call.tracker
        return tracker.outcome(
            tracker.success_outcome,
            self.state.fields(),
            partial=True,
            extra_flags=(*self.flags, "stream_closed_early"),
        )

    def _dropped_outcome(self, exc: Exception) -> Outcome | None:
        tracker = self.call.tracker
        fields = self.state.fields()
        return tracker.outcome(
            tracker.error_outcome,
            UpstreamError(f"The upstream stream broke off ({type(exc).__name__})."),
            partial_usage=fields.usage,
            output_text=fields.text,
            error_type="APIConnectionError",
        )

    async def _complete(self, outcome: Outcome | None) -> None:
        await complete_shielded(self.call.tracker, outcome, self.gateway.runtime.db_worker)
