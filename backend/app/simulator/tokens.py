"""Deterministic token estimates, close enough to OpenAI's to make usage look real.

A text costs ``ceil(len(text) / 4)`` tokens. A prompt costs 4 tokens per message plus its text
(content, text parts, name, tool-call names and arguments), plus the JSON of ``tools`` if any,
plus 3 tokens priming the reply. A reply costs its text, and each tool call its name and arguments
plus 3; at least 1 token. No tokenizer is used on purpose: the simulator must be exact and
reproducible across machines, not faithful to one model's vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
REPLY_PRIMING_TOKENS = 3
TOKENS_PER_TOOL_CALL = 3

# o1, o3-mini, o4-mini, gpt-5, gpt-5.1-codex, ... but not gpt-5-chat-latest (no reasoning).
_REASONING_MODEL = re.compile(r"^(o\d+(-[\w.-]+)?|gpt-5[\w.-]*)$")


def text_tokens(text: str) -> int:
    """Tokens of a piece of text: one per four characters, rounded up."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def message_text(message: Mapping[str, Any]) -> str:
    """All the text of a chat message that a model would read."""
    parts: list[str] = []
    content = message.get("content")
    if isinstance(content, str):
        parts.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, Mapping):
                text = part.get("text") or part.get("refusal")
                if isinstance(text, str):
                    parts.append(text)
    name = message.get("name")
    if isinstance(name, str):
        parts.append(name)
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(function, Mapping):
            parts.extend(str(function.get(key) or "") for key in ("name", "arguments"))
    return "\n".join(parts)


def message_tokens(message: Mapping[str, Any]) -> int:
    return TOKENS_PER_MESSAGE + text_tokens(message_text(message))


def tools_tokens(tools: Sequence[Any] | None) -> int:
    return text_tokens(json.dumps(list(tools), sort_keys=True)) if tools else 0


def prompt_tokens(messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None) -> int:
    """The estimated ``usage.prompt_tokens`` of a request."""
    return tools_tokens(tools) + sum(message_tokens(m) for m in messages) + REPLY_PRIMING_TOKENS


def reply_tokens(content: str | None, tool_calls: Sequence[tuple[str, str]]) -> int:
    """Visible completion tokens of one choice; ``tool_calls`` as ``(name, arguments)``."""
    tokens = text_tokens(content or "")
    tokens += sum(
        text_tokens(name) + text_tokens(args) + TOKENS_PER_TOOL_CALL for name, args in tool_calls
    )
    return max(1, tokens)


def is_reasoning_model(model: str) -> bool:
    """True for o-series and gpt-5 models (a provider prefix like ``openai/`` is ignored)."""
    name = model.rsplit("/", 1)[-1].lower()
    return bool(_REASONING_MODEL.match(name)) and "-chat" not in name


def prefix_digests(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None
) -> list[tuple[str, int]]:
    """``(digest, tokens)`` of each message prefix, shortest first, for prompt caching.

    Tools are part of every prefix, as OpenAI puts them ahead of the messages.
    """
    hasher = hashlib.sha256(json.dumps(list(tools or ()), sort_keys=True).encode())
    tokens = tools_tokens(tools)
    digests: list[tuple[str, int]] = []
    for message in messages:
        hasher.update(json.dumps(message, sort_keys=True, default=str).encode())
        tokens += message_tokens(message)
        digests.append((hasher.copy().hexdigest(), tokens))
    return digests


@dataclass(frozen=True)
class TokenUsage:
    """The numbers of an OpenAI ``CompletionUsage``; ``completion`` includes ``reasoning``."""

    prompt: int
    completion: int
    cached: int = 0
    reasoning: int = 0

    @property
    def total(self) -> int:
        return self.prompt + self.completion

    def negated(self) -> TokenUsage:
        """The same usage with every count negative (at least -1), for the fault."""
        return TokenUsage(
            -max(1, self.prompt), -max(1, self.completion), -self.cached, -self.reasoning
        )

    def to_openai(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.total,
            "prompt_tokens_details": {"cached_tokens": self.cached, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": self.reasoning,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
