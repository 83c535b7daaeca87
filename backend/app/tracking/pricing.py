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
from pathlib import Path
from typing import Literal, Protocol

from genai_prices import Usage
from genai_prices import types as gp

from app.core.money import usd_to_pico
from app.tracking.price_table import (
    PriceSource,
    PriceTable,
    bundled_table,
    load_price_file,
    overrides_source,
)
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
    source: str  # "override", "genai-prices" (the snapshot or a price file) or "none"
    # Provenance, recorded on the row: the price source's compact reference, the entry that
    # matched ("provider:model id", or the override's name) and what chose among the entry's
    # prices ("service_tier=flex", "input>200000": a variant, a long-context tier).
    ref: str | None = None
    entry: str | None = None
    tier: str | None = None

    def terms(self) -> PricedTerms:
        """The quote as a row records it: cost in pico-dollars (``usd_to_pico``), status,
        ref, entry, tier; an unpriced quote costs 0 and has no provenance."""
        if self.status == "unpriced":
            return UNPRICED_COST
        return (usd_to_pico(self.cost_usd), self.status, self.ref, self.entry, self.tier)


# A rate in USD per million tokens is this many pico-dollars per token.
_PICO_PER_MTOK_USD = 10**6
# ``ModelPrice.cost`` sums in Decimal's default 28-digit context: below this many scaled units
# every one of its terms and sums is exact, so integer arithmetic gives the same result.
_EXACT_BELOW = 10**27


def _decimal_places(value: Decimal) -> int:
    exponent = value.normalize().as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


@dataclass(frozen=True, slots=True)
class IntegerRates:
    """One ``ModelPrice`` as integers: pico-dollars per token times ``10**places``, so that
    ``ModelPrice.cost`` of any counts, times 10**12 and rounded half-even (``usd_to_pico``), is
    the counts' integer sum rounded the same way."""

    uncached: int
    cached: int
    output: int
    reasoning_extra: int  # a reasoning token's rate above the output rate (0: none billed apart)
    places: int
    limit: int

    @classmethod
    def of(cls, price: ModelPrice) -> IntegerRates:
        cache = price.input_mtok if price.cache_read_mtok is None else price.cache_read_mtok
        extra = (
            Decimal(0) if price.reasoning_mtok is None else price.reasoning_mtok - price.output_mtok
        )
        rates = [
            r * _PICO_PER_MTOK_USD for r in (price.input_mtok, cache, price.output_mtok, extra)
        ]
        places = max(_decimal_places(r) for r in rates)
        scale = 10**places
        a, b, c, d = (int(r * scale) for r in rates)
        # Counts below this (in absolute value) keep every term's sum below _EXACT_BELOW.
        limit = _EXACT_BELOW // (2 * (abs(a) + abs(b) + abs(c) + abs(d)) + 1)
        return cls(a, b, c, d, places, limit)

    def pico(self, prompt: int, completion: int, cached: int, reasoning: int) -> int | None:
        """The cost in pico-dollars; None when it is too large to be sure of matching Decimal."""
        limit = self.limit
        if not (
            -limit < prompt < limit
            and -limit < completion < limit
            and -limit < cached < limit
            and -limit < reasoning < limit
        ):
            return None
        total = (
            (prompt - cached) * self.uncached
            + cached * self.cached
            + completion * self.output
            + reasoning * self.reasoning_extra
        )
        if not self.places:
            return total
        # Round half-even, as ``usd_to_pico`` (Decimal.to_integral_value) does, for any sign.
        half: int = 10**self.places
        quotient, remainder = divmod(total, half)
        twice = 2 * remainder
        if twice > half or (twice == half and quotient % 2):
            quotient += 1
        return quotient


PricedTerms = tuple[int, CostStatus, str | None, str | None, str | None]
UNPRICED_COST: PricedTerms = (0, "unpriced", None, None, None)


@dataclass(frozen=True, slots=True)
class QuoteTerms:
    """How ``PriceBook.quote`` prices one model (provider, service tier) at some time, ready to
    price many rows: ``price`` gives the cost in pico-dollars, the status, the price source's
    ref, the entry and the tier label of ``quote`` on the same counts. ``timeless``: the same
    terms hold at every time (no dated prices, no dated variants)."""

    priced: bool
    source: str
    ref: str | None
    entry: str | None
    variant: str | None
    base: IntegerRates | None
    tiers: tuple[tuple[int, IntegerRates], ...]  # by ascending start
    label_starts: tuple[int, ...]  # descending: the first one a prompt exceeds names its tier
    timeless: bool
    kept: object = None  # the price objects these were made from (their ids key a cache)

    @classmethod
    def of(
        cls,
        rates: Rates,
        ref: str | None,
        entry: str | None,
        variant: str | None,
        label_starts: tuple[int, ...],
        timeless: bool,
        *,
        source: str = "genai-prices",
        kept: object = None,
    ) -> QuoteTerms:
        if isinstance(rates, TieredPrice):
            base = IntegerRates.of(rates.base)
            tiers = tuple((start, IntegerRates.of(p)) for start, p in rates.tiers)
        elif isinstance(rates, ModelPrice):
            base, tiers = IntegerRates.of(rates), ()
        else:  # pragma: no cover - the two kinds of rates this module makes
            raise TypeError(f"no integer form for {rates!r}")
        return cls(
            True, source, ref, entry, variant, base, tiers, label_starts, timeless, kept or rates
        )

    def price(
        self, prompt: int, completion: int, cached: int, reasoning: int, estimated: bool
    ) -> PricedTerms | None:
        """Cost (pico-dollars), status, ref, entry, tier; None: ask ``quote`` instead."""
        if not self.priced:
            return UNPRICED_COST
        rates = self.base
        for start, tier_rates in reversed(self.tiers):
            if prompt > start:
                rates = tier_rates
                break
        assert rates is not None
        cost = rates.pico(prompt, completion, cached, reasoning)
        if cost is None:
            return None
        status: CostStatus = "estimated" if estimated else "priced"
        if self.source == "override":
            return (cost, status, self.ref, self.entry, None)
        label = ""
        for start in self.label_starts:
            if prompt > start:
                label = f"input>{start}"
                break
        return (cost, status, self.ref, self.entry, _join(self.variant or "", label))


UNPRICED_TERMS = QuoteTerms(False, "none", None, None, None, None, (), (), True)
# A snapshot entry of a call: its price provider and model, the source's ref, the entry, the
# price context of its service tier, and whether its prices hold at every time.
_SnapshotCall = tuple[gp.Provider, gp.ModelInfo, str, str, Mapping[str, str] | None, bool]


def _tier_starts(price: gp.ModelPrice) -> tuple[int, ...]:
    """Every tier start of ``price`` (what ``_tier_label`` looks at), descending."""
    starts = {
        tier.start
        for value in vars(price).values()
        if isinstance(value, gp.TieredPrices)
        for tier in value.tiers
    }
    return tuple(sorted(starts, reverse=True))


_UNPRICED = PriceQuote(Decimal(0), "unpriced", "none")
# genai-prices' request context keys (``price_variants``) that a call's service tier selects.
_SERVICE_TIER_KEY = "service_tier"


class PriceBook:
    """Prices calls; thread-safe. One warning per unknown model, then silence.

    ``table``: the providers to price from (default: genai-prices' bundled snapshot; with a
    ``PRICES_FILE``, ``price_table.load_price_file``). ``overrides`` win over the table.
    """

    def __init__(
        self,
        overrides: Mapping[str, Mapping[str, Decimal]] | None = None,
        table: PriceTable | None = None,
    ) -> None:
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
        self.table = table or bundled_table()
        self.overrides_source = overrides_source(overrides or {})
        self._warned: set[str] = set()
        self._resolved: dict[tuple[str, str | None, str | None], ResolvedModel] = {}
        self._endpoints: dict[str, Endpoint | None] = {}
        self._unit_prices: dict[tuple[str, str | None, str | None], ModelPrice | None] = {}
        # (id(standard price), ids of the variants applied) -> (the objects, kept alive so the
        # ids stay their own; the rates to price with, or None when only genai-prices'
        # calculation is exact; the tier label of the variants).
        self._rates: dict[
            tuple[int, tuple[int, ...]], tuple[gp.ModelPrice, object, Rates | None, str]
        ] = {}
        self._terms: dict[tuple[object, ...], QuoteTerms] = {}
        self._terms_of_call: dict[
            tuple[str, str | None, str | None, str | None], QuoteTerms | _SnapshotCall
        ] = {}
        self._lock = threading.Lock()

    @classmethod
    def configured(
        cls, overrides: Mapping[str, Mapping[str, Decimal]], prices_file: Path | None
    ) -> PriceBook:
        """The book of the settings ``PRICE_OVERRIDES`` and ``PRICES_FILE``; a file that cannot
        be used raises ``PriceFileError`` saying which and why."""
        return cls(overrides, load_price_file(prices_file) if prices_file is not None else None)

    @property
    def sources(self) -> tuple[PriceSource, ...]:
        """Every source this book prices from (for the ``price_source`` table)."""
        found = (self.table.snapshot, self.table.file, self.overrides_source)
        return tuple(source for source in found if source is not None)

    def resolve(
        self, model: str, provider: str | None = None, endpoint: str | None = None
    ) -> ResolvedModel:
        """The provider and price-table entry of ``model`` (cached: the table is fixed)."""
        key = (model, provider, endpoint)
        try:
            return self._resolved[key]
        except KeyError:
            pass
        resolved = resolve_model(model, provider, self.endpoint(endpoint), self.table.providers)
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

    def _override(
        self, model: str, resolved: ResolvedModel | None
    ) -> tuple[str, ModelPrice] | None:
        override = self._overrides.get(model)
        if override is not None:
            return model, override
        if resolved is not None and resolved.model_ref != model:
            override = self._overrides.get(resolved.model_ref)
            if override is not None:
                return resolved.model_ref, override
        return None

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
        found = self._override(model, resolved)
        price = found[1] if found is not None else _unit_price_of(resolved)
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
        service_tier: str | None = None,
    ) -> PriceQuote:
        """The exact cost of ``usage`` on ``model`` served by ``provider`` at ``endpoint``, at
        the prices in force at ``at`` (default: now; some providers price by time of day), in
        ``service_tier`` (the tier the provider reported: ``flex``, ``priority``...) where the
        price table has a price for it."""
        status: CostStatus = "estimated" if estimated else "priced"
        override = self._overrides.get(model)
        if override is not None:
            return self._override_quote(model, override, usage, status)
        resolved = self.resolve(model, provider, endpoint)
        found = self._override(model, resolved)
        if found is not None:
            return self._override_quote(found[0], found[1], usage, status)
        info, price_provider = resolved.info, resolved.price_provider
        if info is None or price_provider is None:
            self._warn_unpriced(model, resolved.provider)
            return _UNPRICED
        now = datetime.now(UTC) if at is None else at
        if now.tzinfo is None:  # a naive time read back from the ledger is UTC
            now = now.replace(tzinfo=UTC)
        ref = self.table.source_of(info).ref
        entry = f"{price_provider.id}:{info.id}"
        context = {_SERVICE_TIER_KEY: service_tier} if service_tier else None
        price, rates, variant = self._price_and_rates(price_provider, info, now, context)
        if rates is not None:
            tier = _join(variant, _tier_label(price, usage.prompt_tokens))
            return PriceQuote(rates.cost(usage), status, "genai-prices", ref, entry, tier)
        try:
            calc = info.calc_price(
                _gp_usage(usage), price_provider, genai_request_timestamp=now, price_context=context
            )
        except (LookupError, ValueError, ArithmeticError):
            # A price genai-prices cannot apply to these counts: unpriced, never a guess.
            logger.exception("genai-prices could not price %r", model)
            return _UNPRICED
        tier = _join(variant, _tier_label(price, usage.prompt_tokens))
        return PriceQuote(Decimal(calc.total_price), status, "genai-prices", ref, entry, tier)

    def terms(
        self,
        model: str,
        *,
        provider: str | None = None,
        endpoint: str | None = None,
        at: datetime | None = None,
        service_tier: str | None = None,
    ) -> QuoteTerms | None:
        """What ``quote`` prices calls of ``model`` with (same arguments), as integer rates that
        price any token counts with the cost and provenance ``quote`` gives them (its cost as
        ``usd_to_pico`` makes it); None where only genai-prices' calculation is exact. For
        pricing many rows at once (``app.prices.recompute``); ``QuoteTerms.timeless`` says
        whether the terms hold at every time."""
        key = (model, provider, endpoint, service_tier)
        try:
            fixed = self._terms_of_call[key]
        except KeyError:
            fixed = self._fixed_terms(model, provider, endpoint, service_tier)
            with self._lock:
                if len(self._terms_of_call) < _CACHE_LIMIT:
                    self._terms_of_call[key] = fixed
        if isinstance(fixed, QuoteTerms):
            return fixed
        # A snapshot price: the one in force at ``at`` (what ``quote`` does from here on).
        price_provider, info, ref, entry, context, timeless = fixed
        now = datetime.now(UTC) if at is None else at
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        price, rates, variant = self._price_and_rates(price_provider, info, now, context)
        if rates is None:
            return None
        terms_key = (id(rates), id(price), ref, entry, variant, timeless)
        made = self._terms.get(terms_key)
        if made is None:
            made = QuoteTerms.of(
                rates,
                ref,
                entry,
                variant or None,
                _tier_starts(price),
                timeless,
                kept=(rates, price),
            )
            with self._lock:
                if len(self._terms) < _CACHE_LIMIT:
                    self._terms[terms_key] = made  # holds ``rates`` and ``price``: their ids stay
        if timeless:
            # The same terms at every time: the call's next lookup ends at its first step.
            with self._lock:
                if key in self._terms_of_call:
                    self._terms_of_call[key] = made
        return made

    def _fixed_terms(
        self, model: str, provider: str | None, endpoint: str | None, service_tier: str | None
    ) -> QuoteTerms | _SnapshotCall:
        """What of ``quote`` does not depend on the time: an override's or the unpriced terms,
        or the snapshot entry to look the price up in."""
        override = self._overrides.get(model)
        if override is not None:
            return self._override_terms(model, override)
        resolved = self.resolve(model, provider, endpoint)
        found = self._override(model, resolved)
        if found is not None:
            return self._override_terms(*found)
        info, price_provider = resolved.info, resolved.price_provider
        if info is None or price_provider is None:
            self._warn_unpriced(model, resolved.provider)
            return UNPRICED_TERMS
        timeless = isinstance(info.prices, gp.ModelPrice) and all(
            v.constraint is None for v in info.price_variants or ()
        )
        return (
            price_provider,
            info,
            self.table.source_of(info).ref,
            f"{price_provider.id}:{info.id}",
            {_SERVICE_TIER_KEY: service_tier} if service_tier else None,
            timeless,
        )

    def _override_terms(self, name: str, price: ModelPrice) -> QuoteTerms:
        ref = self.overrides_source.ref if self.overrides_source is not None else None
        return QuoteTerms.of(price, ref, name, None, (), True, source="override")

    def _override_quote(
        self, name: str, price: ModelPrice, usage: TokenUsage, status: CostStatus
    ) -> PriceQuote:
        ref = self.overrides_source.ref if self.overrides_source is not None else None
        return PriceQuote(price.cost(usage), status, "override", ref, name)

    def _price_and_rates(
        self,
        provider: gp.Provider,
        info: gp.ModelInfo,
        now: datetime,
        context: Mapping[str, str] | None,
    ) -> tuple[gp.ModelPrice, Rates | None, str]:
        """The model's price at ``now`` in ``context``, its verified rates (None: only
        genai-prices' calculation is exact) and the label of the variants applied."""
        standard = info.get_prices(now)
        variants = _variants_applied(info, now, context)
        key = (id(standard), tuple(id(v) for v in variants))
        try:
            price, _kept, rates, label = self._rates[key]
            return price, rates, label
        except KeyError:
            pass
        price = info.get_prices(now, context) if variants else standard
        rates = _rates_of(price)
        if rates is not None:
            for probe in _probes(rates):
                exact = info.calc_price(
                    _gp_usage(probe), provider, genai_request_timestamp=now, price_context=context
                )
                if rates.cost(probe) != exact.total_price:
                    rates = None
                    break
        label = ",".join(
            f"{k}={v}" for variant in variants for k, v in sorted(variant.when.items())
        )
        with self._lock:
            if len(self._rates) < _CACHE_LIMIT:
                self._rates[key] = (price, (standard, variants), rates, label)
        return price, rates, label

    def _warn_unpriced(self, model: str, provider: str) -> None:
        with self._lock:
            if model in self._warned:
                return
            self._warned.add(model)
        logger.warning(
            "No price known for model %r (provider %r): its calls are recorded with "
            "cost_status=unpriced. Add it to PRICE_OVERRIDES or PRICES_FILE to price it.",
            model,
            provider,
        )


def _variants_applied(
    info: gp.ModelInfo, now: datetime, context: Mapping[str, str] | None
) -> tuple[gp.PriceVariant, ...]:
    """The model's price variants that ``context`` selects at ``now`` (genai-prices' rule)."""
    if not context or not info.price_variants:
        return ()
    return tuple(
        variant
        for variant in info.price_variants
        if (variant.constraint is None or variant.constraint.active(now))
        and all(context.get(key) == value for key, value in variant.when.items())
    )


def _tier_label(price: gp.ModelPrice, prompt_tokens: int) -> str:
    """``input>N`` when a long-context tier (starting above N prompt tokens) priced the call."""
    start = None
    for value in vars(price).values():
        if isinstance(value, gp.TieredPrices):
            for tier in value.tiers:
                if prompt_tokens > tier.start and (start is None or tier.start > start):
                    start = tier.start
    return f"input>{start}" if start is not None else ""


def _join(*labels: str) -> str | None:
    return ",".join(label for label in labels if label) or None


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
