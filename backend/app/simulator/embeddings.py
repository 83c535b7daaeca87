"""Embeddings as OpenAI answers ``POST /v1/embeddings``: one deterministic vector per input.

A vector is a unit vector drawn from a generator seeded with the input's SHA-256, so the same
text always embeds the same way and different texts differ. Its length is ``dimensions`` when
the request gives one, else the model's (3072 for ``*-large``, 1536 otherwise). With
``encoding_format: "base64"`` (what the SDK asks for by default) the floats go as little-endian
float32 bytes in base64, as OpenAI sends them. Usage is ``prompt_tokens`` (a text's estimate, a
token-id input's length) and ``total_tokens``, the same number.
"""

from __future__ import annotations

import array
import base64
import hashlib
import json
import math
import random
import sys
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.simulator.config import FaultName, UsageOverride
from app.simulator.tokens import TokenUsage, text_tokens

LARGE_DIMENSIONS = 3072
DEFAULT_DIMENSIONS = 1536
ABSURD_TOKENS = 10**12


class EmbeddingsRequest(BaseModel):
    """The fields of an embeddings request the simulator reads; others are kept."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, le=8192)

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if value == "" or value == [] or (isinstance(value, list) and "" in value):
            raise ValueError("input must not be empty")
        return value

    @property
    def inputs(self) -> list[str | list[int]]:
        value = self.input
        if isinstance(value, str):
            return [value]
        if value and all(isinstance(v, int) for v in value):
            return [list(value)]  # type: ignore[arg-type]
        return list(value)  # type: ignore[arg-type]

    @property
    def user_text(self) -> str:
        """What scripts match ``match_user`` against: the text inputs, one per line."""
        return "\n".join(v for v in self.inputs if isinstance(v, str))


def _dimensions(request: EmbeddingsRequest) -> int:
    if request.dimensions is not None:
        return request.dimensions
    return LARGE_DIMENSIONS if request.model.endswith("-large") else DEFAULT_DIMENSIONS


def vector(value: str | list[int], dimensions: int) -> list[float]:
    """The unit vector of ``value``: the same input, the same vector."""
    seed = hashlib.sha256(json.dumps(value).encode()).digest()
    dice = random.Random(seed)  # noqa: S311 - simulation, not security
    raw = [dice.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def _encoded(values: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return values
    packed = array.array("f", values)
    if sys.byteorder != "little":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode()


def billed_usage(request: EmbeddingsRequest, override: UsageOverride | None) -> TokenUsage:
    tokens = sum(max(1, text_tokens(v)) if isinstance(v, str) else len(v) for v in request.inputs)
    if override is not None and override.prompt_tokens is not None:
        tokens = override.prompt_tokens
    return TokenUsage(prompt=tokens, completion=0)


def reported_usage(usage: TokenUsage, fault: FaultName | None) -> dict[str, int]:
    tokens = usage.prompt
    if fault == "negative_usage":
        tokens = -max(1, tokens)
    elif fault == "absurd_usage":
        tokens = ABSURD_TOKENS
    return {"prompt_tokens": tokens, "total_tokens": tokens}


def embeddings_body(
    request: EmbeddingsRequest, usage: TokenUsage, fault: FaultName | None
) -> dict[str, Any]:
    """The ``CreateEmbeddingResponse`` JSON."""
    dimensions = _dimensions(request)
    data = [
        {
            "object": "embedding",
            "index": index,
            "embedding": _encoded(vector(value, dimensions), request.encoding_format),
        }
        for index, value in enumerate(request.inputs)
    ]
    return {
        "object": "list",
        "data": data,
        "model": request.model,
        "usage": reported_usage(usage, fault),
    }
