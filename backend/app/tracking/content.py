"""Opt-in content on spans, in the GenAI conventions' JSON shapes (v1.41.1).

Only with ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``: ``gen_ai.input.messages``
(``[{"role", "parts": [{"type": "text", "content"}, {"type": "tool_call", ...},
{"type": "tool_call_response", ...}]}]``), ``gen_ai.output.messages`` (one message per choice,
with its ``finish_reason``), ``gen_ai.system_instructions`` (the Responses API's
``instructions``, given apart from the history) and ``gen_ai.tool.definitions`` (type and name:
the conventions advise against the large optional properties by default). Span attributes
cannot hold structures, so each is a JSON string, as the conventions allow.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from app.tracking import semconv as sc
from app.tracking.operations import EMBEDDINGS, RESPONSES, Operation, ResponseFields

_FINISH_REASONS = {"tool_calls": "tool_call", "function_call": "tool_call"}


def _json(value: Any) -> str:
    return json.dumps(value, default=str, ensure_ascii=False)


def _plain(value: Any) -> Any:
    return value.model_dump() if hasattr(value, "model_dump") else value


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def _content_parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    parts: list[dict[str, Any]] = []
    for part in content if isinstance(content, list | tuple) else ():
        part = _plain(part)
        if isinstance(part, Mapping) and isinstance(part.get("text"), str):
            parts.append({"type": "text", "content": part["text"]})
        elif isinstance(part, Mapping):
            parts.append({"type": str(part.get("type") or "unknown")})  # media: type only
    return parts


def _chat_message(message: Any) -> dict[str, Any]:
    message = _plain(message)
    if not isinstance(message, Mapping):
        return {"role": "user", "parts": [{"type": "text", "content": str(message)}]}
    role = message.get("role") or "user"
    if role == "developer":
        role = "system"
    parts = _content_parts(message.get("content"))
    for call in message.get("tool_calls") or ():
        call = _plain(call)
        function = call.get("function") or {}
        parts.append(
            {
                "type": "tool_call",
                "id": call.get("id"),
                "name": function.get("name"),
                "arguments": _arguments(function.get("arguments")),
            }
        )
    if role == "tool":
        response = message.get("content")
        parts = [
            {"type": "tool_call_response", "id": message.get("tool_call_id"), "response": response}
        ]
    return {"role": role, "parts": parts}


def _responses_input(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "parts": [{"type": "text", "content": value}]}]
    messages: list[dict[str, Any]] = []
    for item in value if isinstance(value, list | tuple) else ():
        item = _plain(item)
        if not isinstance(item, Mapping):
            continue
        kind = item.get("type")
        if kind == "function_call":
            part = {
                "type": "tool_call",
                "id": item.get("call_id"),
                "name": item.get("name"),
                "arguments": _arguments(item.get("arguments")),
            }
            messages.append({"role": "assistant", "parts": [part]})
        elif kind == "function_call_output":
            part = {
                "type": "tool_call_response",
                "id": item.get("call_id"),
                "response": item.get("output"),
            }
            messages.append({"role": "tool", "parts": [part]})
        elif "role" in item:
            messages.append(_chat_message(item))
    return messages


def _tool_definitions(tools: Any) -> list[dict[str, Any]]:
    definitions = []
    for tool in tools if isinstance(tools, list | tuple) else ():
        tool = _plain(tool)
        if not isinstance(tool, Mapping):
            continue
        nested = tool.get("function")
        function = nested if isinstance(nested, Mapping) else tool
        definitions.append(
            {"type": str(tool.get("type") or "function"), "name": function.get("name")}
        )
    return definitions


def content_attributes(operation: Operation, request: Mapping[str, Any]) -> dict[str, Any]:
    """The request's opt-in content attributes."""
    attrs: dict[str, Any] = {}
    if operation is EMBEDDINGS:
        return attrs
    if operation is RESPONSES:
        messages = _responses_input(request.get("input"))
        instructions = request.get("instructions")
        if isinstance(instructions, str) and instructions:
            attrs[sc.GEN_AI_SYSTEM_INSTRUCTIONS] = _json(
                [{"type": "text", "content": instructions}]
            )
    else:
        messages = [_chat_message(m) for m in request.get("messages") or ()]
    attrs[sc.GEN_AI_INPUT_MESSAGES] = _json(messages)
    tools = _tool_definitions(request.get("tools"))
    if tools:
        attrs[sc.GEN_AI_TOOL_DEFINITIONS] = _json(tools)
    return attrs


def _finish(reason: str | None) -> str:
    return _FINISH_REASONS.get(reason or "", reason or "stop")


def output_messages(operation: Operation, fields: ResponseFields) -> list[dict[str, Any]]:
    """One output message per choice (a Responses API response is one)."""
    raw = fields.raw
    if operation is RESPONSES and raw is not None:
        parts: list[dict[str, Any]] = []
        for item in getattr(raw, "output", None) or []:
            kind = getattr(item, "type", None)
            if kind == "message":
                for content in item.content:
                    text = getattr(content, "text", None)
                    if isinstance(text, str):
                        parts.append({"type": "text", "content": text})
            elif kind == "function_call":
                parts.append(
                    {
                        "type": "tool_call",
                        "id": item.call_id,
                        "name": item.name,
                        "arguments": _arguments(item.arguments),
                    }
                )
        reason = fields.finish_reasons[0] if fields.finish_reasons else None
        return [{"role": "assistant", "parts": parts, "finish_reason": _finish(reason)}]
    choices = getattr(raw, "choices", None) if raw is not None else None
    if choices is not None:
        messages = []
        for choice in choices:
            message = _chat_message(choice.message)
            message["role"] = "assistant"
            message["finish_reason"] = _finish(choice.finish_reason)
            messages.append(message)
        return messages
    if fields.choice_texts is not None:  # a chat stream: text per choice
        reasons = fields.choice_reasons or {}
        return [
            {
                "role": "assistant",
                "parts": [{"type": "text", "content": text}],
                "finish_reason": _finish(reasons.get(index)),
            }
            for index, text in sorted(fields.choice_texts.items())
        ]
    reason = fields.finish_reasons[0] if fields.finish_reasons else None
    return [
        {
            "role": "assistant",
            "parts": [{"type": "text", "content": fields.text}],
            "finish_reason": _finish(reason),
        }
    ]


def output_attributes(operation: Operation, fields: ResponseFields) -> dict[str, Any]:
    """The response's opt-in content attribute."""
    if operation is EMBEDDINGS:
        return {}
    return {sc.GEN_AI_OUTPUT_MESSAGES: _json(output_messages(operation, fields))}
