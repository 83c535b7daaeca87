"""Which provider serves a call: its OpenTelemetry name and its genai-prices entry.

The provider of a call is found, in this order, from

1. an explicit setting: ``provider=`` on the call, on the client, or ``LLM_PROVIDER``;
2. the endpoint's URL, matched against each genai-prices provider's API URL pattern
   (``https://api.anthropic.com/v1`` is Anthropic, ``https://openrouter.ai/api/v1`` OpenRouter);
3. a ``provider/model`` prefix naming a provider genai-prices knows (``anthropic/claude-...``,
   as LiteLLM-style gateways take it), priced as the model after the prefix;
4. the model's name, by genai-prices' own rules (``claude-*`` is Anthropic, ``gemini-*`` Google,
   ``deepseek*`` DeepSeek, ``mistral-*`` Mistral, ``gpt-*`` and ``o1``/``o3``/``o4`` OpenAI);
5. else ``openai``: the API the client speaks, as OpenTelemetry's own OpenAI instrumentation
   reports it. Its catalogue still prices OpenAI models the name rules miss
   (``text-embedding-3-small``); any other model stays unpriced.

Names are the ``gen_ai.provider.name`` values of the OpenTelemetry GenAI conventions where they
define one (``gcp.gemini``, ``mistral_ai``, ``x_ai``, ``aws.bedrock``, ``azure.ai.openai``), else
genai-prices' provider id. An explicit setting may use either spelling. A provider genai-prices
does not know (``LLM_PROVIDER=vllm``) is recorded as given, and its models are priced only by
``PRICE_OVERRIDES``.

Nothing here is on the hot path: ``PriceBook.resolve`` caches the answer per (model, setting,
endpoint).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from genai_prices import data_snapshot
from genai_prices import types as gp
from genai_prices.data_snapshot import find_provider_by_id

DEFAULT_PROVIDER = "openai"

# genai-prices provider id -> the GenAI conventions' well-known gen_ai.provider.name value.
_SEMCONV_NAMES = {
    "google": "gcp.gemini",
    "mistral": "mistral_ai",
    "x-ai": "x_ai",
    "aws": "aws.bedrock",
    "azure": "azure.ai.openai",
}
# The conventions' names (and common spellings) -> genai-prices provider id.
_PRICE_IDS = {
    "gcp.gemini": "google",
    "gcp.vertex_ai": "google",
    "gcp.gen_ai": "google",
    "mistral_ai": "mistral",
    "x_ai": "x-ai",
    "xai": "x-ai",
    "aws.bedrock": "aws",
    "azure.ai.openai": "azure",
    "azure.ai.inference": "azure",
}
_VERTEX_HOST = re.compile(r"(^|[.-])aiplatform\.googleapis\.com$")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where calls go: the base URL and its ``server.address`` / ``server.port``."""

    url: str
    address: str | None
    port: int | None

    @classmethod
    def parse(cls, url: str | None) -> Endpoint | None:
        if not url:
            return None
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            return cls(url=url, address=None, port=None)
        if port is None and parts.scheme in ("http", "https"):
            port = 443 if parts.scheme == "https" else 80
        return cls(url=url, address=parts.hostname, port=port)


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A model name resolved to its provider and, when genai-prices knows it, its prices."""

    provider: str  # the gen_ai.provider.name value, also the llm_usage.provider column
    source: str  # how it was found: explicit | endpoint | prefix | model | default
    model_ref: str  # the name the model is priced under (a provider prefix removed)
    price_provider: gp.Provider | None
    info: gp.ModelInfo | None


def semconv_name(provider_id: str, endpoint: Endpoint | None = None) -> str:
    """The ``gen_ai.provider.name`` of a genai-prices provider (Vertex AI told apart by host)."""
    if provider_id == "google" and endpoint and _VERTEX_HOST.search(endpoint.address or ""):
        return "gcp.vertex_ai"
    return _SEMCONV_NAMES.get(provider_id, provider_id)


def normalize_provider(name: str) -> str:
    """An explicit provider setting in the conventions' spelling (``google`` -> ``gcp.gemini``)."""
    name = name.strip().lower()
    return name if name in _PRICE_IDS else _SEMCONV_NAMES.get(name, name)


Providers = list[gp.Provider]


def bundled_providers() -> Providers:
    """genai-prices' bundled snapshot (the price table used when no ``PRICES_FILE`` is set)."""
    return data_snapshot.get_snapshot().providers


def _price_provider(name: str, providers: Providers) -> gp.Provider | None:
    return find_provider_by_id(providers, _PRICE_IDS.get(name, name))


def _by_endpoint(endpoint: Endpoint | None, providers: Providers) -> gp.Provider | None:
    if endpoint is None:
        return None
    for candidate in providers:
        if re.match(candidate.api_pattern, endpoint.url):
            return candidate
    return None


def _by_model_name(model: str, providers: Providers) -> gp.Provider | None:
    for candidate in providers:
        if candidate.model_match is not None and candidate.model_match.is_match(model.lower()):
            return candidate
    return None


def _model_ref(model: str, provider: gp.Provider, providers: Providers) -> str:
    """The name ``provider`` prices ``model`` under: ``model`` itself when it knows it, else
    ``model`` without a ``provider/`` prefix naming ``provider`` (``anthropic/claude-...``)."""
    prefix, slash, rest = model.partition("/")
    if not slash or not rest or _price_provider(prefix.lower(), providers) is not provider:
        return model
    if provider.find_model(model, all_providers=providers):
        return model
    return rest


def resolve_model(
    model: str,
    provider: str | None = None,
    endpoint: Endpoint | None = None,
    providers: Providers | None = None,
) -> ResolvedModel:
    """The provider and price-table model of ``model`` (see the module docstring for the
    order); ``providers`` is the price table (default: genai-prices' bundled snapshot)."""
    table = bundled_providers() if providers is None else providers
    found: gp.Provider | None
    ref = model
    if provider:
        name = normalize_provider(provider)
        found = _price_provider(name, table)
        if found is not None:
            ref = _model_ref(model, found, table)
        return _resolved(name, "explicit", ref, found, table)
    found = _by_endpoint(endpoint, table)
    if found is not None:
        source, ref = "endpoint", _model_ref(model, found, table)
    else:
        prefix, slash, rest = model.partition("/")
        found = _price_provider(prefix.lower(), table) if slash and rest else None
        if found is not None:
            source, ref = "prefix", rest
        else:
            found = _by_model_name(model, table)
            source = "model" if found is not None else "default"
            found = found or _price_provider(DEFAULT_PROVIDER, table)
    assert found is not None  # the default provider is in every table (a file only adds)
    return _resolved(semconv_name(found.id, endpoint), source, ref, found, table)


def _resolved(
    name: str, source: str, ref: str, found: gp.Provider | None, providers: Providers
) -> ResolvedModel:
    info = found.find_model(ref, all_providers=providers) if found is not None else None
    return ResolvedModel(
        provider=name, source=source, model_ref=ref, price_provider=found, info=info
    )
