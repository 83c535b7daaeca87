"""What the simulated model chooses beyond its text: the tool call ``tool_choice`` forces, and
the token log-probabilities ``logprobs`` asks for.

- ``tool_choice``: ``"required"`` makes the reply a call of the first function tool, a named
  function (``{"type": "function", "function": {"name": ...}}``) a call of that one, ``"none"``
  no call at all; ``"auto"`` (the default) leaves the reply as scripted. A forced call's
  arguments are a JSON instance of the function's ``parameters`` schema. As at OpenAI, a forced
  call ends with ``finish_reason`` ``"tool_calls"`` (required) or ``"stop"`` (named), and asking
  for a call without tools, or for a function that is not among them, is a 400.
- ``logprobs``: one entry per token of the content (the simulator's tokens are the stream's
  pieces: a word with its leading space), each with ``top_logprobs`` alternatives, the token
  itself first. The numbers are made up but fixed: the same text gives the same log-probabilities.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from app.simulator.structured import instance_of

PIECES = re.compile(r"\s*\S+|\s+")


def text_pieces(text: str) -> list[str]:
    """The simulator's tokens of ``text``: what a stream sends one delta at a time."""
    return PIECES.findall(text)


def _function_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[Mapping[str, Any]]:
    return [
        tool["function"]
        for tool in tools or ()
        if tool.get("type") == "function" and isinstance(tool.get("function"), Mapping)
    ]


def check_tool_choice(tool_choice: Any, tools: Sequence[Mapping[str, Any]] | None) -> None:
    """Raise ``ValueError`` (a 400) for a ``tool_choice`` the request's tools cannot satisfy."""
    if tool_choice in (None, "auto", "none"):
        return
    functions = _function_tools(tools)
    if tool_choice == "required":
        if not functions:
            raise ValueError("tool_choice 'required' needs at least one function in tools")
        return
    name = forced_name(tool_choice)
    if name is None:
        raise ValueError("tool_choice must be 'none', 'auto', 'required' or a named function")
    if name not in {f.get("name") for f in functions}:
        raise ValueError(f"tool_choice names function {name!r}, which is not in tools")


def forced_name(tool_choice: Any) -> str | None:
    """The function a named ``tool_choice`` forces (chat's and the Responses API's shapes)."""
    if not isinstance(tool_choice, Mapping) or tool_choice.get("type") != "function":
        return None
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, Mapping) else tool_choice.get("name")
    return name if isinstance(name, str) else None


def forced_call(
    tool_choice: Any, tools: Sequence[Mapping[str, Any]] | None, text: str
) -> tuple[dict[str, Any], str] | None:
    """The tool call ``tool_choice`` forces, with its finish reason; None when it forces none."""
    functions = _function_tools(tools)
    if tool_choice == "required" and functions:
        function, finish = functions[0], "tool_calls"
    elif (name := forced_name(tool_choice)) is not None:
        found = [f for f in functions if f.get("name") == name]
        if not found:
            return None
        function, finish = found[0], "stop"
    else:
        return None
    schema = function.get("parameters") or {"type": "object", "properties": {}}
    arguments = instance_of(schema, text) if isinstance(schema, Mapping) else {}
    call = {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": str(function.get("name")), "arguments": json.dumps(arguments)},
    }
    return call, finish


def _logprob(token: str, rank: int) -> float:
    digest = int.from_bytes(hashlib.sha256(f"{rank}:{token}".encode()).digest()[:4], "big")
    return -round(0.0001 + rank * 1.5 + (digest % 10_000) / 10_000, 6)


def _entry(token: str, rank: int) -> dict[str, Any]:
    return {"token": token, "logprob": _logprob(token, rank), "bytes": list(token.encode())}


def token_logprobs(pieces: Sequence[str], top: int) -> list[dict[str, Any]]:
    """``choices[].logprobs.content`` for ``pieces``, with ``top`` alternatives each."""
    content = []
    for piece in pieces:
        alternatives = [_entry(piece, 0)]
        alternatives += [_entry(f"{piece.rstrip()}{'~' * rank}", rank) for rank in range(1, top)]
        content.append({**_entry(piece, 0), "top_logprobs": alternatives[:top]})
    return content
