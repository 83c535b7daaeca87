"""What a model does with a request's output constraints: JSON schemas, stop sequences, seeds.

- ``instance_of(schema, text)``: a JSON value valid against a ``response_format`` /
  ``text.format`` JSON schema (the subset Structured Outputs accepts: objects, arrays, strings,
  numbers, integers, booleans, null, ``enum``, ``const``, ``anyOf``/``oneOf``/``allOf``, local
  ``$ref``s into ``$defs``/``definitions``, ``minItems``, ``minLength``, ``minimum``). Strings
  carry the reply's text, so a scripted reply still shows through.
- ``cut_at_stop(text, stop)``: the text up to the first stop sequence, as OpenAI cuts it (the
  sequence itself is not returned).
- ``fingerprint(seed)``: a ``system_fingerprint`` that is the same for the same seed, so a test
  can see the seed reached the model.

Written by hand: a JSON-schema *instance generator* (not a validator) with no dependency is a
page of code, and the simulator must stay deterministic.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

DEFAULT_FINGERPRINT = "fp_asa_simulator"
MAX_DEPTH = 12


def fingerprint(seed: int | None) -> str:
    if seed is None:
        return DEFAULT_FINGERPRINT
    return "fp_" + hashlib.sha256(str(seed).encode()).hexdigest()[:10]


def cut_at_stop(text: str, stop: str | list[str] | None) -> tuple[str, bool]:
    """``text`` up to the earliest stop sequence, and whether one was found."""
    sequences = [stop] if isinstance(stop, str) else list(stop or [])
    positions = [text.find(s) for s in sequences if s]
    found = [p for p in positions if p >= 0]
    if not found:
        return text, False
    return text[: min(found)], True


def _resolve(ref: str, root: Mapping[str, Any]) -> Mapping[str, Any]:
    node: Any = root
    for part in ref.removeprefix("#/").split("/"):
        node = node.get(part, {}) if isinstance(node, Mapping) else {}
    return node if isinstance(node, Mapping) else {}


def instance_of(
    schema: Mapping[str, Any], text: str, root: Mapping[str, Any] | None = None, depth: int = 0
) -> Any:
    """A value that validates against ``schema``; strings are ``text``."""
    root = schema if root is None else root
    if depth > MAX_DEPTH:
        return None
    if "$ref" in schema:
        return instance_of(_resolve(str(schema["$ref"]), root), text, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if options:
            # Prefer a non-null option: a reply is more useful than a null.
            chosen = next((o for o in options if o.get("type") != "null"), options[0])
            return instance_of(chosen, text, root, depth + 1)
    if schema.get("allOf"):
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            value = instance_of(part, text, root, depth + 1)
            if isinstance(value, dict):
                merged.update(value)
            else:
                return value
        return merged
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), kind[0] if kind else None)
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties") or {}
        required = schema.get("required")
        names = list(properties) if required is None else [n for n in properties if n in required]
        return {name: instance_of(properties[name], text, root, depth + 1) for name in names}
    if kind == "array":
        items = schema.get("items") or {}
        count = max(1, int(schema.get("minItems") or 0))
        return [instance_of(items, text, root, depth + 1) for _ in range(count)]
    if kind == "string":
        value = text or "x"
        minimum = int(schema.get("minLength") or 0)
        return value + "x" * max(0, minimum - len(value))
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        value = 0 if low is None else low + (1 if "exclusiveMinimum" in schema else 0)
        return int(value) if kind == "integer" else float(value)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return text


def schema_of(response_format: Any) -> Mapping[str, Any] | None:
    """The JSON schema of a chat ``response_format`` (``{"type": "json_schema", "json_schema":
    {"schema": ...}}``) or a Responses ``text.format`` (``{"type": "json_schema", "schema":
    ...}``); None for any other format."""
    if not isinstance(response_format, Mapping) or response_format.get("type") != "json_schema":
        return None
    nested = response_format.get("json_schema")
    schema = nested.get("schema") if isinstance(nested, Mapping) else response_format.get("schema")
    return schema if isinstance(schema, Mapping) else {}
