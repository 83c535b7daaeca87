"""Exact prices for LLM calls, for every provider genai-prices knows.

Prices come from genai-prices' bundled snapshot (never downloaded at run time), except for
models in the local override table (``PRICE_OVERRIDES``), which wins. Each call's model is first
resolved to its provider and snapshot entry (``app.tracking.providers``: explicit setting,
endpoint URL, ``provider/model`` prefix, model name), once per (model, setting, endpoint).

genai-prices' own calculation costs ~0.1 ms a call (it resolves its unit registry each time),
which is most of what tracking adds to a call. So each snapshot price (a model's
``ModelPrice`` for the current time) is checked once against that calculation on probe token
counts; when it is piecewise linear in the counts a call reports — plain per-token rates, or
rates chosen by the prompt's size (a long-context tier: genai-prices bills *all* tokens of a
prompt above the tier's start at the tier's rates) — later calls price with those rates
directly, the same Decimal terms genai-prices sums, and any other price (a per-request fee, say)
keeps going through genai-prices. OpenAI reports ``cached_tokens`` as part of ``prompt_tokens``
and ``reasoning_tokens`` as part of ``completion_tokens``: cached tokens are priced at the
cache-read rate instead of the input rate, and reasoning tokens at the output rate (or a
reasoning rate where the provider bills one), once — never on top of the totals that hold them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Literal, Protocol

from genai_prices import Usage
from genai_prices import types as gp

from app.tracking.providers import Endpoint, ResolvedModel, resolve_model

logger = logging.getLogger(__name__)

CostStatus = Literal["priced", "unpriced", "estimated"]
_MTOK = Decimal(1_000_000)
_CACHE_LIMIT = 1000  # model names come from callers: every cache here stays bounded


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Token counts of one call, in OpenAI's terms (cached within prompt, reasoning within
    completion)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Rates(Protocol):
    def cost(self, usage: TokenUsage) -> Decimal: ...


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per million tokens."""

    input_mtok: Decimal
    output_mtok: Decimal
    cache_read_mtok: Decimal | None = None
    reasoning_mtok: Decimal | None = None  # where reasoning is billed apart from output

    def cost(self, usage: TokenUsage) -> Decimal:
        cache_rate = self.input_mtok if self.cache_read_mtok is None else self.cache_read_mtok
        uncached = usage.prompt_tokens - usage.cached_tokens
        output = usage.completion_tokens * self.output_mtok
        if self.reasoning_mtok is not None:
            output += usage.reasoning_tokens * (self.reasoning_mtok - self.output_mtok)
        return (uncached * self.input_mtok + usage.cached_tokens * cache_rate + output) / _MTOK


@dataclass(frozen=True, slots=True)
class TieredPrice:
    """Rates chosen by the prompt's size: the last tier whose ``start`` the prompt exceeds
    prices every token of the call (genai-prices' threshold rule), else ``base``."""

    base: ModelPrice
    tiers: tuple[tuple[int, ModelPrice], ...]

    def rates_for(self, prompt_tokens: int) -> ModelPrice:
        for start, rates in reversed(self.tiers):
            if prompt_tokens > start:
                return rates
        return self.base

    def cost(self, usage: TokenUsage) -> Decimal:
        return self.rates_for(usage.prompt_tokens).cost(usage)


@dataclass(frozen=True, slots=True)
class PriceQuote:
    cost_usd: Decimal
    status: CostStatus
    source: str  # "override", "genai-prices" or "none"


class PriceBook:
    """Prices calls; thread-safe. One warning per unknown model, then silence."""

    def __init__(self, overrides: Mapping[str, Mapping[str, Decimal]] | None = None) -> None:
        self._overrides = {
            name: ModelPrice(
                input_mtok=Decimal(str(p["input_mtok"])),
                output_mtok=Decimal(str(p["output_mtok"])),
                cache_read_mtok=(
                    Decimal(str(p["cache_read_mtok"])) if "cache_read_mtok" in p else None
                ),
            )
            for name, p in (overrides or {}).items()
        }
        self._warned: set[str] = set()
        self._resolved: dict[tuple[str, str | None, str | None], ResolvedModel] = {}
        self._endpoints: dict[str, Endpoint | None] = {}
        self._unit_prices: dict[tuple[str, str | None, str | None], ModelPrice | None] = {}
        # id(snapshot ModelPrice) -> (that object, kept alive so the id stays its own; the
        # rates to price it with, or None when only genai-prices' calculation is exact).
        self._rates: dict[int, tuple[gp.ModelPrice, Rates | None]] = {}
        self._lock = threading.Lock()

    def resolve(
        self, model: str, provider: str | None = None, endpoint: str | None = None
    ) -> ResolvedModel:
        """The provider and snapshot entry of ``model`` (cached: the snapshot is fixed)."""
        key = (model, provider, endpoint)
        try:
            return self._resolved[key]
        except KeyError:
            pass
        resolved = resolve_model(model, provider, self.endpoint(endpoint))
        with self._lock:
            if len(self._resolved) < _CACHE_LIMIT:
                self._resolved[key] = resolved
        return resolved

    def endpoint(self, url: str | None) -> Endpoint | None:
        """``url`` parsed into ``server.address`` / ``server.port`` (cached)."""
        if url is None:
            return None
        try:
            return self._endpoints[url]
        except KeyError:
            pass
        parsed = Endpoint.parse(url)
        with self._lock:
            if len(self._endpoints) < _CACHE_LIMIT:
                self._endpoints[url] = parsed
        return parsed

    def _override(self, model: str, resolved: ResolvedModel | None) -> ModelPrice | None:
        override = self._overrides.get(model)
        if override is None and resolved is not None and resolved.model_ref != model:
            override = self._overrides.get(resolved.model_ref)
        return override

    def unit_price(
        self, model: str, provider: str | None = None, endpoint: str | None = None
    ) -> ModelPrice | None:
        """Per-MTok rates for ``model`` (for budget reservations); None when unknown.

        A tiered price gives the rates of a million-token prompt: its highest tier, so a
        reservation never falls short. Cached per model and provider.
        """
        override = self._overrides.get(model)
        if override is not None:
            return override
        key = (model, provider, endpoint)
        try:
            return self._unit_prices[key]
        except KeyError:
            pass
        resolved = self.resolve(model, provider, endpoint)
        price = self._override(model, resolved) or _unit_price_of(resolved)
        with self._lock:
            if len(self._unit_prices) < _CACHE_LIMIT:
                self._unit_prices[key] = price
        return price

    def quote(
        self,
        model: str,
        usage: TokenUsage,
        *,
        estimated: bool = False,
        provider: str | None = None,
        endpoint: str | None = None,
        at: datetime | None = None,
    ) -> PriceQuote:
        """The exact cost of ``usage`` on ``model`` served by ``provider`` at ``endpoint``, at
        the prices in force at ``at`` (default: now; some providers price by time of day)."""
        status: CostStatus = "estimated" if estimated else "priced"
        override = self._overrides.get(model)
        if override is not None:
            return PriceQuote(override.cost(usage), status, "override")
        resolved = self.resolve(model, provider, endpoint)
        override = self._override(model, resolved)
        if override is not None:
            return PriceQuote(override.cost(usage), status, "override")
        info, found = resolved.info, resolved.price_provider
        if info is None or found is None:
            self._warn_unpriced(model, resolved.provider)
            return PriceQuote(Decimal(0), "unpriced", "none")
        now = at or datetime.now(UTC)
        rates = self._verified_rates(found, info, info.get_prices(now), now)
        if rates is not None:
            return PriceQuote(rates.cost(usage), status, "genai-prices")
        try:
            calc = info.calc_price(_gp_usage(usage), found, genai_request_timestamp=now)
        except (LookupError, ValueError, ArithmeticError):
            # A price genai-prices cannot apply to these counts: unpriced, never a guess.
            logger.exception("genai-prices could not price %r", model)
            return PriceQuote(Decimal(0), "unpriced", "none")
        return PriceQuote(Decimal(calc.total_price), status, "genai-prices")

    def _verified_rates(
        self, provider: gp.Provider, info: gp.ModelInfo, price: gp.ModelPrice, now: datetime
    ) -> Rates | None:
        try:
            return self._rates[id(price)][1]
        except KeyError:
            pass
        rates = _rates_of(price)
        if rates is not None:
            for probe in _probes(rates):
                exact = info.calc_price(_gp_usage(probe), provider, genai_request_timestamp=now)
                if rates.cost(probe) != exact.total_price:
                    rates = None
                    break
        with self._lock:
            if len(self._rates) < _CACHE_LIMIT:
                self._rates[id(price)] = (price, rates)
        return rates

    def _warn_unpriced(self, model: str, provider: str) -> None:
        with self._lock:
            if model in self._warned:
                return
            self._warned.add(model)
        logger.warning(
            "No price known for model %r (provider %r): its calls are recorded with "
            "cost_status=unpriced. Add it to PRICE_OVERRIDES to price it.",
            model,
            provider,
        )


def _unit_price_of(resolved: ResolvedModel) -> ModelPrice | None:
    if resolved.info is None or resolved.price_provider is None:
        return None
    try:
        calc = resolved.info.calc_price(
            Usage(input_tokens=1_000_000, output_tokens=1_000_000), resolved.price_provider
        )
    except (LookupError, ValueError):
        return None
    return ModelPrice(input_mtok=calc.input_price, output_mtok=calc.output_price)


# Token counts on which a snapshot price is checked before its rates are trusted; a tiered
# price is also checked on each side of each tier's start.
_PROBES = (
    TokenUsage(prompt_tokens=1_000_000, completion_tokens=0),
    TokenUsage(prompt_tokens=1_000_000, completion_tokens=0, cached_tokens=1_000_000),
    TokenUsage(prompt_tokens=0, completion_tokens=1_000_000, reasoning_tokens=500_000),
    TokenUsage(prompt_tokens=123_457, completion_tokens=9_876, cached_tokens=45_678),
    TokenUsage(prompt_tokens=1, completion_tokens=1),
)


def _probes(rates: Rates) -> tuple[TokenUsage, ...]:
    if not isinstance(rates, TieredPrice):
        return _PROBES
    edges = tuple(
        TokenUsage(prompt_tokens=start + delta, completion_tokens=777, cached_tokens=start // 3)
        for start, _ in rates.tiers
        for delta in (0, 1)
    )
    return (*_PROBES, *edges)


def _gp_usage(usage: TokenUsage) -> Usage:
    return Usage(
        input_tokens=usage.prompt_tokens,
        cache_read_tokens=usage.cached_tokens,
        output_tokens=usage.completion_tokens,
        output_reasoning_tokens=usage.reasoning_tokens,
    )


_RATE_KEYS = ("input_mtok", "output_mtok", "cache_read_mtok", "output_reasoning_mtok")


def _rates_of(price: gp.ModelPrice) -> Rates | None:
    """Rates of a snapshot price: plain, or by prompt size; None when it has neither form.

    Keys other than the four token rates (a web search price, a cache-write rate, tiered or
    not) are left out: they cost nothing on the counts a call reports, which the probes confirm.
    """
    values = {k: v for k, v in vars(price).items() if not k.startswith("_") and v is not None}
    if "input_mtok" not in values:
        return None
    if any(not isinstance(v, Decimal | gp.TieredPrices) for v in values.values()):
        return None
    tiered = [values[k] for k in _RATE_KEYS if isinstance(values.get(k), gp.TieredPrices)]

    def at(prompt_tokens: int) -> ModelPrice:
        def rate(key: str) -> Decimal | None:
            value = values.get(key)
            if isinstance(value, gp.TieredPrices):
                for tier in reversed(value.tiers):
                    if prompt_tokens > tier.start:
                        return tier.price
                return value.base
            return value

        return ModelPrice(
            input_mtok=rate("input_mtok") or Decimal(0),
            output_mtok=rate("output_mtok") or Decimal(0),
            cache_read_mtok=rate("cache_read_mtok"),
            reasoning_mtok=rate("output_reasoning_mtok"),
        )

    starts = sorted({tier.start for value in tiered for tier in value.tiers})
    if not starts:
        return at(0)
    return TieredPrice(base=at(0), tiers=tuple((start, at(start + 1)) for start in starts))
