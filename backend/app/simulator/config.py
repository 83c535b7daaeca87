"""Simulator configuration and the script format.

Everything here is a pydantic model, so a config or a script file is plain JSON.

Faults (``FaultName``), selectable per request by the ``x-sim-fault`` header, by a script reply,
by ``SimulatorConfig.fault_schedule`` or by ``SimulatorConfig.fault_rates``:

- ``"429"``: HTTP 429 ``rate_limit_exceeded`` with ``Retry-After`` and ``retry-after-ms`` headers.
- ``"500"``: HTTP 500 ``server_error``.
- ``"400"``: HTTP 400 ``invalid_request_error``.
- ``"timeout"``: the answer is held back for ``timeout_fault_seconds`` (longer than a short client
  timeout), then served normally; the wait ends early when the client goes away.
- ``"truncate"``: the body stops mid-way and the connection is closed: a stream loses its finish
  chunk, its usage chunk and ``[DONE]``; a plain response is cut inside its JSON.
- ``"malformed"``: a stream carries one event whose data is not JSON; a plain response's body is
  not JSON.
- ``"negative_usage"`` / ``"absurd_usage"``: a normal answer whose ``usage`` has negative token
  counts / counts of ``10**12``.

Script format (a JSON file holds a list of rules, or ``{"scripts": [...]}``)::

    {"name": "fix-agent",                    # optional, shown nowhere but useful in errors
     "match_user": "fix the bug",            # substring of the last user message
     "match_system": "You are a fixer",      # substring of the system/developer messages
     "match_model": "gpt-4o",                # substring of the requested model
     "regex": false,                         # true: the match_* fields are regexes (re.search)
     "replies": ["bad edit", {"content": "good edit", "usage": {"cached_tokens": 512}}],
     "after_last": "repeat"}                 # "repeat" the last reply, "cycle", or "stop" matching

Every given ``match_*`` must match; a rule without any matches every request. Rules are tried in
order and the first match answers; each rule advances through ``replies`` one per request. A reply
is a string (its content) or a ``ScriptedReply``: ``content``, ``tool_calls`` (``[{"name",
"arguments", "id"?}]``, answered with ``finish_reason="tool_calls"``), ``fault``, ``finish_reason``,
``latency_ms`` and ``usage`` (exact ``prompt_tokens``, ``completion_tokens``, ``cached_tokens``,
``reasoning_tokens``; given numbers are used as is for the whole response, missing ones are
estimated).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

FaultName = Literal[
    "429", "500", "400", "timeout", "truncate", "malformed", "negative_usage", "absurd_usage"
]
FAULT_NAMES: tuple[FaultName, ...] = (
    "429",
    "500",
    "400",
    "timeout",
    "truncate",
    "malformed",
    "negative_usage",
    "absurd_usage",
)
FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]

DEFAULT_MODELS = (
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1",
    "gpt-4.1-mini",
    "o3",
    "o4-mini",
    "gpt-5",
    "gpt-5-mini",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScriptedToolCall(_Strict):
    """One function tool call of a scripted reply; ``arguments`` may be given as an object."""

    name: str = Field(min_length=1)
    arguments: str = "{}"
    id: str | None = None

    @field_validator("arguments", mode="before")
    @classmethod
    def _arguments_as_json(cls, value: object) -> object:
        return value if isinstance(value, str) else json.dumps(value)


class UsageOverride(_Strict):
    """Exact usage numbers; ``completion_tokens`` includes ``reasoning_tokens`` as at OpenAI."""

    prompt_tokens: int | None = Field(default=None, ge=0)
    completion_tokens: int | None = Field(default=None, ge=0)
    cached_tokens: int | None = Field(default=None, ge=0)
    reasoning_tokens: int | None = Field(default=None, ge=0)


class ScriptedReply(_Strict):
    """What one scripted request gets back (all choices of an ``n>1`` request get the same)."""

    content: str | None = None
    tool_calls: list[ScriptedToolCall] = Field(default_factory=list)
    fault: FaultName | None = None
    finish_reason: FinishReason | None = None
    latency_ms: float | None = Field(default=None, ge=0, le=600_000)
    usage: UsageOverride | None = None


class ScriptRule(_Strict):
    """A matcher and the sequence of replies it gives, one per matching request."""

    name: str | None = None
    match_user: str | None = None
    match_system: str | None = None
    match_model: str | None = None
    regex: bool = False
    replies: list[ScriptedReply] = Field(min_length=1)
    after_last: Literal["repeat", "cycle", "stop"] = "repeat"

    @model_validator(mode="before")
    @classmethod
    def _single_reply(cls, data: object) -> object:
        # Convenience: {"reply": ...} for a rule with one reply.
        if isinstance(data, dict) and "reply" in data and "replies" not in data:
            data = dict(data)
            data["replies"] = [data.pop("reply")]
        return data

    @field_validator("replies", mode="before")
    @classmethod
    def _strings_are_content(cls, value: object) -> object:
        if isinstance(value, list):
            return [{"content": item} if isinstance(item, str) else item for item in value]
        return value


class ScheduledFault(_Strict):
    """Fail the next ``times`` requests with ``fault`` (consumed in order of the schedule)."""

    fault: FaultName
    times: int = Field(default=1, ge=1, le=1_000_000)


class SimulatorConfig(_Strict):
    """How the simulator behaves. Every default is a fast, fault-free, deterministic simulator."""

    latency_ms: float = Field(default=0.0, ge=0, le=600_000, description="Before each answer.")
    stream_chunk_delay_ms: float = Field(default=0.0, ge=0, le=60_000)
    timeout_fault_seconds: float = Field(default=30.0, gt=0, le=300)
    retry_after_seconds: float = Field(default=1.0, gt=0, le=60)
    default_reply: str = "This is a simulated reply from the ASA LLM simulator."
    models: list[str] = Field(default_factory=lambda: list(DEFAULT_MODELS))

    scripts: list[ScriptRule] = Field(default_factory=list)
    scripts_path: Path | None = Field(default=None, description="JSON rules, tried after scripts.")

    fault_schedule: list[ScheduledFault] = Field(default_factory=list)
    fault_rates: dict[FaultName, float] = Field(
        default_factory=dict, description="Probability per request of each fault, from `seed`."
    )
    seed: int = 0

    # Prompt caching as OpenAI does it: a prefix seen before, from 1024 tokens in steps of 128.
    prompt_cache: bool = True
    cache_min_tokens: int = Field(default=1024, ge=0)
    cache_increment_tokens: int = Field(default=128, ge=1)
    prompt_cache_entries: int = Field(default=10_000, ge=1)

    # Reasoning models: reasoning_tokens = base + per_output_token * visible completion tokens.
    reasoning_tokens_base: int = Field(default=64, ge=0)
    reasoning_tokens_per_output_token: int = Field(default=2, ge=0)

    @field_validator("fault_rates")
    @classmethod
    def _rates_are_probabilities(cls, value: dict[FaultName, float]) -> dict[FaultName, float]:
        if any(not 0.0 <= rate <= 1.0 for rate in value.values()):
            raise ValueError("fault rates are probabilities in [0, 1]")
        if sum(value.values()) > 1.0:
            raise ValueError("fault rates must sum to at most 1")
        return value


_RULES = TypeAdapter(list[ScriptRule])


def parse_script_rules(data: Any) -> list[ScriptRule]:
    """Rules from decoded JSON: a list of rules, one rule, or ``{"scripts": [...]}``."""
    if isinstance(data, dict):
        data = data.get("scripts", [data])
    return _RULES.validate_python(data)


def load_script_file(path: Path) -> list[ScriptRule]:
    """Rules from a JSON file in the format described in this module's docstring."""
    return parse_script_rules(json.loads(path.read_text(encoding="utf-8")))
