"""From a chat-completions request to an OpenAI-shaped answer: plain body or stream chunks.

The bodies follow the official SDK's ``ChatCompletion`` and ``ChatCompletionChunk`` types. The
unscripted reply is ``SimulatorConfig.default_reply`` (wrapped as ``{"reply": ...}`` when
``response_format`` asks for JSON). ``max_completion_tokens`` (or ``max_tokens``) cuts the content
and sets ``finish_reason="length"``; on reasoning models the reasoning tokens count against it.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import dataclass, field
from itertools import chain, zip_longest
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.simulator.config import FaultName, ScriptedReply, SimulatorConfig, UsageOverride
from app.simulator.sampling import check_tool_choice, forced_call, text_pieces, token_logprobs
from app.simulator.state import SimulatorState
from app.simulator.structured import cut_at_stop, fingerprint, instance_of, schema_of
from app.simulator.tokens import (
    CHARS_PER_TOKEN,
    TokenUsage,
    is_reasoning_model,
    message_text,
    prefix_digests,
    prompt_tokens,
    reply_tokens,
    text_tokens,
)

SYSTEM_FINGERPRINT = "fp_asa_simulator"
SERVICE_TIERS = ("default", "flex", "priority", "scale")


def served_tier(asked: str | None) -> str:
    """The ``service_tier`` of an answer: the one asked for, ``default`` for ``auto``/none."""
    return asked if asked in SERVICE_TIERS else "default"


ABSURD_TOKENS = 10**12


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields of an OpenAI chat-completions request the simulator reads; others are kept."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=128)
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    service_tier: str | None = None
    tool_choice: Any = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _sampling_options(self) -> ChatCompletionRequest:
        check_tool_choice(self.tool_choice, self.tools)
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def served_tier(self) -> str:
        """The tier OpenAI reports it served the request in (``auto`` runs as ``default``)."""
        return served_tier(self.service_tier)

    def _texts(self, *roles: str) -> list[str]:
        return [message_text(m) for m in self.messages if m.get("role") in roles]

    @property
    def last_user_text(self) -> str:
        texts = self._texts("user")
        return texts[-1] if texts else ""

    @property
    def system_text(self) -> str:
        return "\n".join(self._texts("system", "developer"))

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def wants_json(self) -> bool:
        kind = (self.response_format or {}).get("type")
        return kind in ("json_object", "json_schema")


@dataclass(frozen=True)
class Choice:
    content: str | None
    tool_calls: list[dict[str, Any]]
    finish_reason: str
    logprobs: list[dict[str, Any]] | None = None  # one entry per piece of ``content``

    def logprobs_body(self, start: int = 0, stop: int | None = None) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        return {"content": self.logprobs[start:stop], "refusal": None}


@dataclass(frozen=True)
class Completion:
    """One planned answer; ``usage`` is what OpenAI would bill, ``reported_usage`` what is sent."""

    model: str
    choices: list[Choice]
    usage: TokenUsage
    reported_usage: dict[str, Any]
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    system_fingerprint: str = SYSTEM_FINGERPRINT
    service_tier: str = "default"

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "service_tier": self.service_tier,
            "system_fingerprint": self.system_fingerprint,
        }

    def body(self) -> dict[str, Any]:
        """The ``ChatCompletion`` JSON."""
        choices = []
        for index, choice in enumerate(self.choices):
            message: dict[str, Any] = {
                "role": "assistant",
                "content": choice.content,
                "refusal": None,
                "annotations": [],
            }
            if choice.tool_calls:
                message["tool_calls"] = choice.tool_calls
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": choice.logprobs_body(),
                    "finish_reason": choice.finish_reason,
                }
            )
        return {
            **self._envelope("chat.completion"),
            "choices": choices,
            "usage": self.reported_usage,
        }

    def chunks(self, *, include_usage: bool) -> list[dict[str, Any]]:
        """The ``ChatCompletionChunk`` JSONs of the stream, choices interleaved, in order.

        The finish chunks of all choices come last, then the usage chunk if asked for.
        """
        per_choice = [_choice_deltas(index, choice) for index, choice in enumerate(self.choices)]
        bodies = [d for d in chain.from_iterable(zip_longest(*per_choice)) if d is not None]
        finishes: list[dict[str, Any]] = [
            {"index": i, "delta": {}, "logprobs": None, "finish_reason": choice.finish_reason}
            for i, choice in enumerate(self.choices)
        ]
        extra = {"usage": None} if include_usage else {}
        chunks = [
            {**self._envelope("chat.completion.chunk"), "choices": [choice], **extra}
            for choice in [*bodies, *finishes]
        ]
        if include_usage:
            chunks.append(
                {
                    **self._envelope("chat.completion.chunk"),
                    "choices": [],
                    "usage": self.reported_usage,
                }
            )
        return chunks


def _choice_deltas(index: int, choice: Choice) -> list[dict[str, Any]]:
    def delta(content: dict[str, Any]) -> dict[str, Any]:
        return {"index": index, "delta": content, "logprobs": None, "finish_reason": None}

    first: dict[str, Any] = {"role": "assistant", "content": "", "refusal": None}
    if choice.content is None:
        first["content"] = None
    deltas = [delta(first)]
    for position, piece in enumerate(text_pieces(choice.content or "")):
        deltas.append(
            {**delta({"content": piece}), "logprobs": choice.logprobs_body(position, position + 1)}
        )
    for position, call in enumerate(choice.tool_calls):
        head = {**call, "index": position, "function": {**call["function"], "arguments": ""}}
        deltas.append(delta({"tool_calls": [head]}))
        arguments = call["function"]["arguments"]
        step = max(1, len(arguments) // 3)
        for start in range(0, len(arguments), step):
            piece = arguments[start : start + step]
            deltas.append(
                delta({"tool_calls": [{"index": position, "function": {"arguments": piece}}]})
            )
    return deltas


def _scripted_choice(
    reply: ScriptedReply | None, request: ChatCompletionRequest, config: SimulatorConfig
) -> Choice:
    tool_calls = [
        {
            "id": call.id or f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for call in (reply.tool_calls if reply else [])
    ]
    if request.tool_choice == "none":
        tool_calls = []
    if reply is not None and (reply.content is not None or tool_calls):
        content = reply.content
    elif request.wants_json:
        schema = schema_of(request.response_format)  # json_schema: an instance of it
        value = {"reply": config.default_reply} if schema is None else None
        if schema is not None:
            value = instance_of(schema, config.default_reply)
        content = json.dumps(value)
    else:
        content = config.default_reply
    finish = (reply.finish_reason if reply else None) or ("tool_calls" if tool_calls else "stop")
    if not tool_calls:
        forced = forced_call(request.tool_choice, request.tools, config.default_reply)
        if forced is not None:
            call, forced_finish = forced
            return Choice(content=None, tool_calls=[call], finish_reason=forced_finish)
    return Choice(content=content, tool_calls=tool_calls, finish_reason=finish)


def plan_completion(
    request: ChatCompletionRequest,
    reply: ScriptedReply | None,
    fault: FaultName | None,
    state: SimulatorState,
) -> Completion:
    """The answer to ``request``: reply, finish reasons, billed and reported usage."""
    config = state.config
    template = _scripted_choice(reply, request, config)
    content, stopped = cut_at_stop(template.content or "", request.stop)
    if stopped:
        template = Choice(content=content, tool_calls=template.tool_calls, finish_reason="stop")
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in template.tool_calls]
    visible = reply_tokens(template.content, calls)
    reasoning = 0
    if is_reasoning_model(request.model):
        reasoning = (
            config.reasoning_tokens_base + config.reasoning_tokens_per_output_token * visible
        )
    limit = request.max_completion_tokens or request.max_tokens
    if limit is not None and visible + reasoning > limit and not template.tool_calls:
        reasoning = min(reasoning, limit)
        content = (template.content or "")[: (limit - reasoning) * CHARS_PER_TOKEN]
        visible = text_tokens(content)
        template = Choice(content=content, tool_calls=[], finish_reason="length")
    if request.logprobs and template.content is not None:
        top = request.top_logprobs or 0
        template = dataclasses.replace(
            template, logprobs=token_logprobs(text_pieces(template.content), top)
        )
    choices = [template]
    for _ in range(request.n - 1):  # every choice gets its own tool-call ids, as at OpenAI
        choices.append(
            _scripted_choice(reply, request, config) if template.tool_calls else template
        )

    usage = _billed_usage(
        request,
        reply.usage if reply else None,
        visible=visible * request.n,
        reasoning=reasoning * request.n,
        state=state,
    )
    return Completion(
        model=request.model,
        choices=choices,
        usage=usage,
        reported_usage=_reported_usage(usage, fault),
        system_fingerprint=fingerprint(request.seed),
        service_tier=request.served_tier,
    )


def _billed_usage(
    request: ChatCompletionRequest,
    override: UsageOverride | None,
    *,
    visible: int,
    reasoning: int,
    state: SimulatorState,
) -> TokenUsage:
    """Estimated usage, with a script's exact numbers taking precedence where given."""
    # Always consult the cache, so that this prompt's prefixes are remembered for the next one.
    cached = state.cached_tokens(prefix_digests(request.messages, request.tools))
    prompt = prompt_tokens(request.messages, request.tools)
    if override is None:
        return TokenUsage(prompt, visible + reasoning, min(cached, prompt), reasoning)
    if override.prompt_tokens is not None:
        prompt = override.prompt_tokens
    cached = min(cached, prompt) if override.cached_tokens is None else override.cached_tokens
    if override.reasoning_tokens is not None:
        reasoning = override.reasoning_tokens
    completion = visible + reasoning
    if override.completion_tokens is not None:
        completion = override.completion_tokens
        if override.reasoning_tokens is None:
            reasoning = min(reasoning, completion)
    return TokenUsage(prompt, completion, cached, reasoning)


def _reported_usage(usage: TokenUsage, fault: FaultName | None) -> dict[str, Any]:
    if fault == "negative_usage":
        return usage.negated().to_openai()
    if fault == "absurd_usage":
        return TokenUsage(ABSURD_TOKENS, ABSURD_TOKENS, ABSURD_TOKENS, ABSURD_TOKENS).to_openai()
    return usage.to_openai()
