"""The Responses API as OpenAI answers ``POST /v1/responses``: a ``Response`` or its events.

A request is planned as the equivalent chat completion (``plan_completion``: the same scripts,
prompt caching, reasoning tokens, ``max_output_tokens`` cut, JSON-schema answers) and rendered
in the Responses API's shapes, which follow the official SDK's ``Response`` type: ``output``
holds a ``reasoning`` item (reasoning models), a ``message`` with one ``output_text`` part, and
a ``function_call`` item per scripted tool call; ``usage`` says ``input_tokens`` /
``output_tokens`` with ``input_tokens_details.cached_tokens`` and
``output_tokens_details.reasoning_tokens``. ``tool_choice`` is honoured as in chat
(``app.simulator.sampling``): ``"required"`` makes the output a ``function_call`` item of the
first function tool, ``{"type": "function", "name": ...}`` one of that function (arguments: a
JSON instance of its ``parameters``), ``"none"`` no call; a choice no tool can satisfy is a
400. A reply cut by ``max_output_tokens`` is
``status: "incomplete"`` with ``incomplete_details.reason: "max_output_tokens"``.

Streamed (``stream: true``), the answer is server-sent events named by their ``type``, in the
order OpenAI sends them: ``response.created``, ``response.in_progress``, then per output item
``response.output_item.added``, (``response.content_part.added``,
``response.output_text.delta``..., ``response.output_text.done``, ``response.content_part.done``
| ``response.function_call_arguments.delta``..., ``response.function_call_arguments.done``),
``response.output_item.done``, and last ``response.completed`` (or ``response.incomplete``)
carrying the full response with its usage. Every event has a ``sequence_number``.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.simulator.completion import ChatCompletionRequest, Completion, served_tier
from app.simulator.sampling import check_tool_choice
from app.simulator.tokens import message_text


class ResponsesRequest(BaseModel):
    """The fields of a Responses API request the simulator reads; others are kept."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = None
    stream: bool = False
    max_output_tokens: int | None = Field(default=None, ge=1)
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = "auto"
    temperature: float | None = None
    top_p: float | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None

    @model_validator(mode="after")
    def _tool_choice(self) -> ResponsesRequest:
        check_tool_choice(self.chat_tool_choice, self.chat_tools)
        return self

    @property
    def chat_tools(self) -> list[dict[str, Any]] | None:
        """The function tools in chat's shape (the Responses API lists a function's ``name``
        and ``parameters`` on the tool itself); other tools (hosted ones) as they are."""
        if self.tools is None:
            return None
        return [
            {"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}
            if tool.get("type") == "function" and "function" not in tool
            else tool
            for tool in self.tools
        ]

    @property
    def chat_tool_choice(self) -> Any:
        """``tool_choice`` as chat reads it: ``none``/``auto``/``required`` or a named function
        (``{"type": "function", "name": ...}``); a hosted tool's or an ``allowed_tools`` choice
        forces no function call here, as ``auto``."""
        choice = self.tool_choice
        if isinstance(choice, Mapping) and choice.get("type") != "function":
            return "auto"
        return choice

    def messages(self) -> list[dict[str, Any]]:
        """The conversation as chat messages (what tokens and prompt caching are counted on)."""
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "developer", "content": self.instructions})
        if isinstance(self.input, str):
            return [*messages, {"role": "user", "content": self.input}]
        for item in self.input:
            kind = item.get("type")
            if kind == "function_call":
                messages.append({"role": "assistant", "content": str(item.get("arguments"))})
            elif kind == "function_call_output":
                messages.append({"role": "tool", "content": str(item.get("output"))})
            elif "role" in item:
                messages.append({"role": item["role"], "content": item.get("content")})
        return messages or [{"role": "user", "content": ""}]

    def as_chat(self) -> ChatCompletionRequest:
        """The equivalent chat-completions request."""
        text_format = (self.text or {}).get("format")
        response_format = None
        if isinstance(text_format, Mapping) and text_format.get("type") == "json_schema":
            response_format = {"type": "json_schema", "json_schema": dict(text_format)}
        elif isinstance(text_format, Mapping) and text_format.get("type") == "json_object":
            response_format = {"type": "json_object"}
        return ChatCompletionRequest(
            model=self.model,
            messages=self.messages(),
            tools=self.chat_tools,
            tool_choice=self.chat_tool_choice,
            response_format=response_format,
            max_completion_tokens=self.max_output_tokens,
        )

    @property
    def last_user_text(self) -> str:
        texts = [message_text(m) for m in self.messages() if m.get("role") == "user"]
        return texts[-1] if texts else ""

    @property
    def system_text(self) -> str:
        roles = ("system", "developer")
        return "\n".join(message_text(m) for m in self.messages() if m.get("role") in roles)


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def responses_usage(reported: Mapping[str, Any]) -> dict[str, Any]:
    """A chat ``usage`` (as the completion plan reports it) in the Responses API's shape."""
    details_in = reported.get("prompt_tokens_details") or {}
    details_out = reported.get("completion_tokens_details") or {}
    return {
        "input_tokens": reported["prompt_tokens"],
        "input_tokens_details": {
            "cached_tokens": details_in.get("cached_tokens", 0),
            "cache_write_tokens": 0,
        },
        "output_tokens": reported["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": details_out.get("reasoning_tokens", 0)},
        "total_tokens": reported["total_tokens"],
    }


@dataclass
class PlannedResponse:
    """A chat plan rendered as a ``Response``; the same ids in the body and in every event."""

    request: ResponsesRequest
    completion: Completion
    id: str = field(default_factory=lambda: _item_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))
    message_id: str = field(default_factory=lambda: _item_id("msg"))
    reasoning_id: str | None = None
    call_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.completion.usage.reasoning:
            self.reasoning_id = _item_id("rs")
        self.call_ids = [_item_id("fc") for _ in self.choice.tool_calls]

    @property
    def choice(self) -> Any:
        return self.completion.choices[0]

    @property
    def incomplete(self) -> bool:
        return bool(self.choice.finish_reason == "length")

    def _message(self, text: str, status: str) -> dict[str, Any]:
        content = [] if status == "in_progress" else [self._text_part(text)]
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    @staticmethod
    def _text_part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _call(self, index: int, arguments: str, status: str) -> dict[str, Any]:
        call = self.choice.tool_calls[index]
        return {
            "type": "function_call",
            "id": self.call_ids[index],
            "call_id": call["id"],
            "name": call["function"]["name"],
            "arguments": arguments,
            "status": status,
        }

    def _reasoning(self) -> dict[str, Any]:
        return {"type": "reasoning", "id": self.reasoning_id, "summary": []}

    def output(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        if self.reasoning_id is not None:
            items.append(self._reasoning())
        if self.choice.content is not None and (self.choice.content or not self.call_ids):
            status = "incomplete" if self.incomplete else "completed"
            items.append(self._message(self.choice.content, status))
        for index, call in enumerate(self.choice.tool_calls):
            items.append(self._call(index, call["function"]["arguments"], "completed"))
        return items

    def body(self, *, final: bool = True) -> dict[str, Any]:
        """The ``Response`` JSON: final, or as ``response.created`` shows it (no output yet)."""
        request = self.request
        status = "in_progress"
        if final:
            status = "incomplete" if self.incomplete else "completed"
        fmt = (request.text or {}).get("format") or {"type": "text"}
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": (
                {"reason": "max_output_tokens"} if final and self.incomplete else None
            ),
            "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "model": request.model,
            "output": self.output() if final else [],
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "service_tier": served_tier(request.service_tier),
            "store": True,
            "temperature": 1.0 if request.temperature is None else request.temperature,
            "text": {"format": fmt},
            "tool_choice": request.tool_choice,
            "tools": request.tools or [],
            "top_p": 1.0 if request.top_p is None else request.top_p,
            "truncation": "disabled",
            "usage": responses_usage(self.completion.reported_usage) if final else None,
            "user": None,
            "metadata": request.metadata or {},
        }

    def events(self) -> list[dict[str, Any]]:
        """The stream's events in order, ``sequence_number`` included."""
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": self.body(final=False)},
            {"type": "response.in_progress", "response": self.body(final=False)},
        ]
        index = 0
        if self.reasoning_id is not None:
            events.append(
                {
                    "type": "response.output_item.added",
                    "output_index": index,
                    "item": self._reasoning(),
                }
            )
            events.append(
                {
                    "type": "response.output_item.done",
                    "output_index": index,
                    "item": self._reasoning(),
                }
            )
            index += 1
        text = self.choice.content
        if text is not None and (text or not self.call_ids):
            events.extend(self._text_events(index, text))
            index += 1
        for position, call in enumerate(self.choice.tool_calls):
            events.extend(self._call_events(index, position, call["function"]["arguments"]))
            index += 1
        final = "response.incomplete" if self.incomplete else "response.completed"
        events.append({"type": final, "response": self.body()})
        return [{**event, "sequence_number": n} for n, event in enumerate(events)]

    def _text_events(self, index: int, text: str) -> list[dict[str, Any]]:
        where = {"item_id": self.message_id, "output_index": index, "content_index": 0}
        status = "incomplete" if self.incomplete else "completed"
        events: list[dict[str, Any]] = [
            {
                "type": "response.output_item.added",
                "output_index": index,
                "item": self._message("", "in_progress"),
            },
            {"type": "response.content_part.added", **where, "part": self._text_part("")},
        ]
        events += [
            {"type": "response.output_text.delta", **where, "delta": piece, "logprobs": []}
            for piece in re.findall(r"\s*\S+|\s+", text)
        ]
        events += [
            {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
            {"type": "response.content_part.done", **where, "part": self._text_part(text)},
            {
                "type": "response.output_item.done",
                "output_index": index,
                "item": self._message(text, status),
            },
        ]
        return events

    def _call_events(self, index: int, position: int, arguments: str) -> list[dict[str, Any]]:
        item_id = self.call_ids[position]
        step = max(1, len(arguments) // 3)
        events: list[dict[str, Any]] = [
            {
                "type": "response.output_item.added",
                "output_index": index,
                "item": self._call(position, "", "in_progress"),
            },
        ]
        events += [
            {
                "type": "response.function_call_arguments.delta",
                "item_id": item_id,
                "output_index": index,
                "delta": arguments[start : start + step],
            }
            for start in range(0, len(arguments), step)
        ]
        events += [
            {
                "type": "response.function_call_arguments.done",
                "item_id": item_id,
                "output_index": index,
                "arguments": arguments,
            },
            {
                "type": "response.output_item.done",
                "output_index": index,
                "item": self._call(position, arguments, "completed"),
            },
        ]
        return events
