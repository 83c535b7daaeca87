"""The routing table: which upstream (and which model there) serves a requested model.

The table is JSON (``GATEWAY_ROUTES`` or ``GATEWAY_ROUTES_FILE``)::

    {"upstreams": {
        "openai": {"base_url": "https://api.openai.com/v1", "api_key": "sk-...",
                   "provider": "openai", "timeout_seconds": 60},
        "backup": {"base_url": "http://10.0.0.5:8000/v1", "api_key": "..."}},
     "models": {
        "gpt-4o-mini": ["openai", "backup"],
        "fast": [{"upstream": "openai", "model": "gpt-4o-mini"}]},
     "default": ["openai"]}

A route is an ordered list of targets: the first answers unless it fails with 429, a 5xx, a
timeout or a dropped connection, then the next is tried (fallbacks). A target is an upstream's
name (the requested model is sent as is) or ``{"upstream", "model"}`` (an alias: that model is
sent). A requested ``upstream/model`` whose prefix names an upstream goes there with the prefix
removed. Any other model takes the ``default`` route. The upstream ``default`` always exists: the
service's own ``OPENAI_BASE_URL``/``OPENAI_API_KEY`` (or the built-in simulator) unless the table
defines it.

Keys live only here, on the server: they are sent to their upstream and nowhere else (they are
masked in logs and error texts like ``OPENAI_API_KEY``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_UPSTREAM = "default"


class RoutingTableError(ValueError):
    """The routing table is malformed; the service refuses to start with it."""


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    base_url: str  # ends without a slash: ``{base_url}/chat/completions``
    api_key: str = field(repr=False)
    provider: str | None = None  # gen_ai.provider.name; None: found from the URL and model
    timeout_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class Target:
    upstream: Upstream
    model: str | None = None  # None: the requested model


@dataclass(frozen=True, slots=True)
class RoutingTable:
    upstreams: Mapping[str, Upstream]
    models: Mapping[str, tuple[Target, ...]]
    default: tuple[Target, ...]

    def route(self, model: str) -> tuple[str, tuple[Target, ...]]:
        """The targets of ``model`` and the model name they are sent (for a target without one
        of its own)."""
        targets = self.models.get(model)
        if targets is not None:
            return model, targets
        prefix, sep, rest = model.partition("/")
        if sep and rest and prefix in self.upstreams:
            return rest, (Target(self.upstreams[prefix]),)
        return model, self.default

    def listed_models(self) -> list[str]:
        """The models the table names (aliases included), for ``GET /v1/models``."""
        return sorted(self.models)


def _upstream(name: str, spec: Any) -> Upstream:
    if not isinstance(spec, Mapping):
        raise RoutingTableError(f"upstream {name!r} must be an object")
    base_url = spec.get("base_url")
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise RoutingTableError(f"upstream {name!r} needs an http(s) base_url")
    api_key = spec.get("api_key", "")
    provider = spec.get("provider")
    timeout = spec.get("timeout_seconds")
    if not isinstance(api_key, str):
        raise RoutingTableError(f"upstream {name!r}: api_key must be a string")
    if provider is not None and not isinstance(provider, str):
        raise RoutingTableError(f"upstream {name!r}: provider must be a string")
    if timeout is not None and (
        not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0
    ):
        raise RoutingTableError(f"upstream {name!r}: timeout_seconds must be a positive number")
    unknown = set(spec) - {"base_url", "api_key", "provider", "timeout_seconds"}
    if unknown:
        raise RoutingTableError(f"upstream {name!r}: unknown fields {sorted(unknown)}")
    return Upstream(
        name,
        base_url.rstrip("/"),
        api_key,
        provider,
        None if timeout is None else float(timeout),
    )


def _targets(what: str, spec: Any, upstreams: Mapping[str, Upstream]) -> tuple[Target, ...]:
    if isinstance(spec, str | Mapping):
        spec = [spec]
    if not isinstance(spec, list) or not spec:
        raise RoutingTableError(f"{what} must be a non-empty list of targets")
    targets: list[Target] = []
    for item in spec:
        name, model = (item, None) if isinstance(item, str) else (None, None)
        if isinstance(item, Mapping):
            name, model = item.get("upstream"), item.get("model")
            if model is not None and (not isinstance(model, str) or not model):
                raise RoutingTableError(f"{what}: a target's model must be a non-empty string")
        if not isinstance(name, str) or name not in upstreams:
            raise RoutingTableError(f"{what}: unknown upstream {name!r}")
        targets.append(Target(upstreams[name], model))
    return tuple(targets)


def parse_routing_table(text: str | None, default: Upstream) -> RoutingTable:
    """The table from its JSON text (None: the default upstream for every model)."""
    if not text or not text.strip():
        return RoutingTable({DEFAULT_UPSTREAM: default}, {}, (Target(default),))
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise RoutingTableError(f"the routing table is not JSON: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise RoutingTableError("the routing table must be a JSON object")
    unknown = set(raw) - {"upstreams", "models", "default"}
    if unknown:
        raise RoutingTableError(f"unknown fields {sorted(unknown)}")
    specs = raw.get("upstreams", {})
    if not isinstance(specs, Mapping):
        raise RoutingTableError("upstreams must be an object")
    upstreams = {DEFAULT_UPSTREAM: default}
    upstreams.update({str(name): _upstream(str(name), spec) for name, spec in specs.items()})
    models_spec = raw.get("models", {})
    if not isinstance(models_spec, Mapping):
        raise RoutingTableError("models must be an object")
    models = {
        str(name): _targets(f"model {name!r}", spec, upstreams)
        for name, spec in models_spec.items()
    }
    default_route = _targets("default", raw.get("default", [DEFAULT_UPSTREAM]), upstreams)
    return RoutingTable(upstreams, models, default_route)
