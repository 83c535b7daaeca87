"""The OpenAI APIs ``LLMClient`` tracks, and what each one's requests and responses say.

One ``Operation`` per API: chat completions (``create`` and ``parse``), the Responses API and
embeddings. It tells the tracker how to read the usage the provider reported (each API has its
own shape), estimate a prompt's tokens when the provider sent none, find the prompt text to mask
in error messages, describe the request on the span (GenAI conventions v1.41.1), and what the
budget guard should reserve for (the guard reads a chat-shaped request). Reading the SDK's
objects is duck-typed on purpose: a provider behind an OpenAI-compatible gateway may omit
fields the official API always sends.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from app.tracking import semconv as sc
from app.tracking.pricing import TokenUsage

# A single call reporting more than this many tokens is treated as a provider bug, not billed.
ABSURD_TOKEN_COUNT = 50_000_000
CHARS_PER_TOKEN = 4


def estimate_tokens(text: str) -> int:
    """A rough token count (4 characters a token), used only when the provider sent none."""
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def estimate_prompt_tokens(messages: Sequence[Any]) -> int:
    """A chat prompt's tokens, roughly: 4 a message plus its content."""
    total = 0
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        total += 4 + estimate_tokens(
            content if isinstance(content, str) else json.dumps(content, default=str)
        )
    return total


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    return None


@dataclass(frozen=True, slots=True)
class UsageReading:
    """Token counts read from a response, with what was wrong and what was actually reported
    (a span carries a usage attribute only for a count the provider reported)."""

    tokens: TokenUsage
    flags: list[str]
    input_known: bool = False
    output_known: bool = False
    cached_known: bool = False
    reasoning_known: bool = False


def read_usage(raw: Any, *, reports_output: bool = True) -> UsageReading:
    """Token counts from an SDK usage object of any of the three APIs (or None).

    Chat and embeddings say ``prompt_tokens``/``completion_tokens`` with
    ``prompt_tokens_details.cached_tokens`` and ``completion_tokens_details.reasoning_tokens``;
    the Responses API says ``input_tokens``/``output_tokens`` with ``input_tokens_details`` and
    ``output_tokens_details``. Embeddings report no output (``reports_output=False``).

    Negative counts become 0 (flag ``negative_tokens``); counts above ABSURD_TOKEN_COUNT are
    discarded (flag ``absurd_tokens``); cached above prompt or reasoning above completion are
    capped (flag ``inconsistent_details``). A flagged row is recorded, never dropped.
    """
    if raw is None:
        return UsageReading(TokenUsage(), ["usage_missing"])
    flags: list[str] = []
    prompt = _int_or_none(getattr(raw, "prompt_tokens", None))
    if prompt is None:
        prompt = _int_or_none(getattr(raw, "input_tokens", None))
    completion = _int_or_none(getattr(raw, "completion_tokens", None))
    if completion is None:
        completion = _int_or_none(getattr(raw, "output_tokens", None))
    details_in = getattr(raw, "prompt_tokens_details", None) or getattr(
        raw, "input_tokens_details", None
    )
    details_out = getattr(raw, "completion_tokens_details", None) or getattr(
        raw, "output_tokens_details", None
    )
    cached_raw = _int_or_none(getattr(details_in, "cached_tokens", None))
    reasoning_raw = _int_or_none(getattr(details_out, "reasoning_tokens", None))
    if not reports_output and completion is None:
        completion = 0
    if prompt is None or completion is None:
        flags.append("usage_malformed")
    values = [prompt or 0, completion or 0, cached_raw or 0, reasoning_raw or 0]
    if any(v < 0 for v in values):
        flags.append("negative_tokens")
        values = [max(v, 0) for v in values]
    absurd = any(v > ABSURD_TOKEN_COUNT for v in values)
    if absurd:
        flags.append("absurd_tokens")
        values = [0, 0, 0, 0]
    prompt_n, completion_n, cached_n, reasoning_n = values
    if cached_n > prompt_n or reasoning_n > completion_n:
        flags.append("inconsistent_details")
        cached_n, reasoning_n = min(cached_n, prompt_n), min(reasoning_n, completion_n)
    honest = not absurd
    return UsageReading(
        TokenUsage(prompt_n, completion_n, cached_n, reasoning_n),
        flags,
        input_known=honest and prompt is not None,
        output_known=honest and reports_output and completion is not None,
        cached_known=honest and cached_raw is not None,
        reasoning_known=honest and reasoning_raw is not None,
    )


@dataclass(slots=True)
class ResponseFields:
    """What a response (or the events of a stream so far) says, in one shape for all APIs."""

    usage: Any = None
    model: str | None = None
    id: str | None = None
    finish_reasons: list[str] = field(default_factory=list)
    text: str = ""
    system_fingerprint: str | None = None
    service_tier: str | None = None
    # Set when the provider reported a failure inside a 200 answer (a Responses API stream's
    # ``response.failed`` or ``error`` event): the call is recorded as an error of this type.
    failure: str | None = None
    # For opt-in content capture: the SDK's response object, or a chat stream's text and
    # finish reason per choice.
    raw: Any = None
    choice_texts: dict[int, str] | None = None
    choice_reasons: dict[int, str] | None = None


def _number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _text_parts(value: Any) -> Iterable[str]:
    """Every text a model would read in a message content, an input item or a list of them."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key in ("content", "text", "output", "arguments", "refusal"):
            if key in value:
                yield from _text_parts(value[key])
        function = value.get("function")
        if isinstance(function, Mapping):
            yield from _text_parts(function)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _text_parts(item)
    elif value is not None and hasattr(value, "model_dump"):  # an SDK object passed as input
        yield from _text_parts(value.model_dump())


def _output_type(response_format: Any) -> str | None:
    """``gen_ai.output.type`` of a chat ``response_format`` or a Responses ``text.format``."""
    if response_format is None:
        return None
    if isinstance(response_format, type):  # a pydantic class given to ``parse``
        return sc.OUTPUT_TYPE_JSON
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind in ("json_schema", "json_object"):
        return sc.OUTPUT_TYPE_JSON
    if kind == "text":
        return sc.OUTPUT_TYPE_TEXT
    return None


def _common_attributes(request: Mapping[str, Any], attrs: dict[str, Any]) -> None:
    for param, attr in (
        ("temperature", sc.GEN_AI_REQUEST_TEMPERATURE),
        ("top_p", sc.GEN_AI_REQUEST_TOP_P),
    ):
        value = request.get(param)
        if _number(value):
            attrs[attr] = float(value)
    if request.get("stream"):
        attrs[sc.GEN_AI_REQUEST_STREAM] = True
    tier = request.get("service_tier")
    if isinstance(tier, str) and tier != "auto":
        attrs[sc.OPENAI_REQUEST_SERVICE_TIER] = tier


class Operation:
    """One API: its names and how to read its requests and responses."""

    name = "chat"  # the llm_usage.operation value
    span_operation = sc.OPERATION_CHAT  # gen_ai.operation.name
    api_type: str | None = sc.API_TYPE_CHAT_COMPLETIONS  # openai.api.type
    reports_output = True

    def prompt_texts(self, request: Mapping[str, Any]) -> list[str]:
        return [t for t in _text_parts(request.get("messages")) if t.strip()]

    def estimate_prompt_tokens(self, request: Mapping[str, Any]) -> int:
        return estimate_prompt_tokens(request.get("messages") or [])

    def request_attributes(self, request: Mapping[str, Any]) -> dict[str, Any]:
        attrs: dict[str, Any] = {}
        _common_attributes(request, attrs)
        for param, attr in (
            ("frequency_penalty", sc.GEN_AI_REQUEST_FREQUENCY_PENALTY),
            ("presence_penalty", sc.GEN_AI_REQUEST_PRESENCE_PENALTY),
        ):
            value = request.get(param)
            if _number(value):
                attrs[attr] = float(value)
        max_tokens = request.get("max_completion_tokens", request.get("max_tokens"))
        if _number(max_tokens):
            attrs[sc.GEN_AI_REQUEST_MAX_TOKENS] = int(max_tokens)
        n = request.get("n")
        if _number(n) and n != 1:
            attrs[sc.GEN_AI_REQUEST_CHOICE_COUNT] = int(n)
        seed = request.get("seed")
        if _number(seed):
            attrs[sc.GEN_AI_REQUEST_SEED] = int(seed)
        stop = request.get("stop")
        if isinstance(stop, str):
            attrs[sc.GEN_AI_REQUEST_STOP_SEQUENCES] = [stop]
        elif isinstance(stop, list | tuple) and all(isinstance(s, str) for s in stop) and stop:
            attrs[sc.GEN_AI_REQUEST_STOP_SEQUENCES] = list(stop)
        output_type = _output_type(request.get("response_format"))
        if output_type is not None:
            attrs[sc.GEN_AI_OUTPUT_TYPE] = output_type
        return attrs

    def budget_request(self, request: Mapping[str, Any]) -> Mapping[str, Any]:
        """The request as the budget guard reads it (a chat request: messages, max tokens)."""
        return request

    def fields(self, response: Any) -> ResponseFields:
        """The fields of a ``ChatCompletion`` (or ``ParsedChatCompletion``)."""
        choices = getattr(response, "choices", None) or []
        reasons = [c.finish_reason for c in choices if getattr(c, "finish_reason", None)]
        text = "".join(
            (getattr(c.message, "content", None) or "")
            for c in choices
            if getattr(c, "message", None) is not None
        )
        return ResponseFields(
            usage=getattr(response, "usage", None),
            model=getattr(response, "model", None),
            id=getattr(response, "id", None),
            finish_reasons=reasons,
            text=text,
            system_fingerprint=getattr(response, "system_fingerprint", None),
            service_tier=getattr(response, "service_tier", None),
            raw=response,
        )


class ResponsesOperation(Operation):
    """The Responses API (``client.responses.create``)."""

    name = "responses"
    span_operation = sc.OPERATION_CHAT
    api_type = sc.API_TYPE_RESPONSES

    def prompt_texts(self, request: Mapping[str, Any]) -> list[str]:
        texts = list(_text_parts(request.get("instructions")))
        texts.extend(_text_parts(request.get("input")))
        return [t for t in texts if t.strip()]

    def estimate_prompt_tokens(self, request: Mapping[str, Any]) -> int:
        items = request.get("input")
        count = len(items) if isinstance(items, list | tuple) else 1
        return 4 * count + sum(estimate_tokens(t) for t in self.prompt_texts(request))

    def request_attributes(self, request: Mapping[str, Any]) -> dict[str, Any]:
        attrs: dict[str, Any] = {}
        _common_attributes(request, attrs)
        max_tokens = request.get("max_output_tokens")
        if _number(max_tokens):
            attrs[sc.GEN_AI_REQUEST_MAX_TOKENS] = int(max_tokens)
        text = request.get("text")
        output_type = _output_type(text.get("format") if isinstance(text, Mapping) else None)
        if output_type is not None:
            attrs[sc.GEN_AI_OUTPUT_TYPE] = output_type
        return attrs

    def budget_request(self, request: Mapping[str, Any]) -> Mapping[str, Any]:
        view: dict[str, Any] = {
            "messages": [{"role": "user", "content": t} for t in self.prompt_texts(request)],
            "tools": request.get("tools"),
        }
        if _number(request.get("max_output_tokens")):
            view["max_tokens"] = request["max_output_tokens"]
        return view

    def fields(self, response: Any) -> ResponseFields:
        """The fields of a ``Response``."""
        status = getattr(response, "status", None)
        output = getattr(response, "output", None) or []
        reason: str | None = None
        if status == "completed":
            calls = any(getattr(item, "type", None) == "function_call" for item in output)
            reason = "tool_calls" if calls else "stop"
        elif status == "incomplete":
            details = getattr(response, "incomplete_details", None)
            why = getattr(details, "reason", None)
            reason = "length" if why == "max_output_tokens" else (why or "incomplete")
        elif status in ("failed", "cancelled"):
            reason = "error" if status == "failed" else "cancelled"
        failure = None
        if status == "failed":
            error = getattr(response, "error", None)
            failure = getattr(error, "code", None) or "response_failed"
        try:
            text = response.output_text
        except (AttributeError, TypeError):
            text = ""
        return ResponseFields(
            usage=getattr(response, "usage", None),
            model=getattr(response, "model", None),
            id=getattr(response, "id", None),
            finish_reasons=[reason] if reason else [],
            text=text or "",
            service_tier=getattr(response, "service_tier", None),
            failure=failure,
            raw=response,
        )


class EmbeddingsOperation(Operation):
    """Embeddings (``client.embeddings.create``)."""

    name = "embeddings"
    span_operation = sc.OPERATION_EMBEDDINGS
    api_type = None  # openai.api.type names chat completions and responses only
    reports_output = False

    @staticmethod
    def _inputs(request: Mapping[str, Any]) -> list[Any]:
        value = request.get("input")
        if isinstance(value, str):
            return [value]
        if isinstance(value, list | tuple):
            if value and all(isinstance(v, int) for v in value):
                return [list(value)]  # one input given as token ids
            return list(value)
        return []

    def prompt_texts(self, request: Mapping[str, Any]) -> list[str]:
        return [v for v in self._inputs(request) if isinstance(v, str) and v.strip()]

    def estimate_prompt_tokens(self, request: Mapping[str, Any]) -> int:
        total = 0
        for value in self._inputs(request):
            total += estimate_tokens(value) if isinstance(value, str) else len(value)
        return total

    def request_attributes(self, request: Mapping[str, Any]) -> dict[str, Any]:
        attrs: dict[str, Any] = {}
        dimensions = request.get("dimensions")
        if _number(dimensions):
            attrs[sc.GEN_AI_EMBEDDINGS_DIMENSION_COUNT] = int(dimensions)
        encoding = request.get("encoding_format")
        if isinstance(encoding, str):
            attrs[sc.GEN_AI_REQUEST_ENCODING_FORMATS] = [encoding]
        return attrs

    def budget_request(self, request: Mapping[str, Any]) -> Mapping[str, Any]:
        # Token-id inputs count one token per id: as text of CHARS_PER_TOKEN characters each.
        contents = [
            v if isinstance(v, str) else "x" * (CHARS_PER_TOKEN * len(v))
            for v in self._inputs(request)
        ]
        return {"messages": [{"role": "user", "content": c} for c in contents], "max_tokens": 1}

    def fields(self, response: Any) -> ResponseFields:
        """The fields of a ``CreateEmbeddingResponse`` (no id, no finish reason)."""
        return ResponseFields(usage=getattr(response, "usage", None), model=response.model)


CHAT = Operation()
RESPONSES = ResponsesOperation()
EMBEDDINGS = EmbeddingsOperation()
