"""Exact prices for LLM calls.

Prices come from genai-prices' bundled snapshot (never downloaded at run time), except for
models in the local override table (``PRICE_OVERRIDES``), which wins.

genai-prices' own calculation costs ~0.1 ms a call (it resolves its unit registry each time),
which is most of what tracking adds to a call. So each snapshot price (a model's
``ModelPrice`` for the current time) is checked once against that calculation on probe token
counts; when it is linear in the three counts a chat call reports (plain per-token rates, no
tiers), later calls price with those rates directly — the same Decimal terms genai-prices sums —
and any other price keeps going through genai-prices. OpenAI reports
``cached_tokens`` as part of ``prompt_tokens`` and ``reasoning_tokens`` as part of
``completion_tokens``: cached tokens are priced at the cache-read rate instead of the input
rate, and reasoning tokens at the output rate, once — never on top of the totals that hold them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Literal

from genai_prices import Usage, calc_price, data_snapshot
from genai_prices import types as gp

logger = logging.getLogger(__name__)

CostStatus = Literal["priced", "unpriced", "estimated"]
_MTOK = Decimal(1_000_000)


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


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per million tokens."""

    input_mtok: Decimal
    output_mtok: Decimal
    cache_read_mtok: Decimal | None = None

    def cost(self, usage: TokenUsage) -> Decimal:
        cache_rate = self.input_mtok if self.cache_read_mtok is None else self.cache_read_mtok
        uncached = usage.prompt_tokens - usage.cached_tokens
        return (
            uncached * self.input_mtok
            + usage.cached_tokens * cache_rate
            + usage.completion_tokens * self.output_mtok
        ) / _MTOK


@dataclass(frozen=True, slots=True)
class PriceQuote:
    cost_usd: Decimal
    status: CostStatus
    source: str  # "override", "genai-prices" or "none"


class PriceBook:
    """Prices calls; thread-safe. One warning per unknown model, then silence."""

    def __init__(
        self,
        overrides: Mapping[str, Mapping[str, Decimal]] | None = None,
        provider_id: str | None = "openai",
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
        self._provider_id = provider_id
        self._warned: set[str] = set()
        self._unit_prices: dict[str, ModelPrice | None] = {}
        self._found: dict[str, tuple[gp.Provider, gp.ModelInfo] | None] = {}
        # id(snapshot ModelPrice) -> (that object, kept alive so the id stays its own; the
        # rates to price it with, or None when only genai-prices' calculation is exact).
        self._linear: dict[int, tuple[gp.ModelPrice, ModelPrice | None]] = {}
        self._lock = threading.Lock()

    def unit_price(self, model: str) -> ModelPrice | None:
        """Per-MTok rates for ``model`` (for budget reservations); None when unknown.

        Cached per model: the bundled snapshot does not change while the process runs.
        """
        if model in self._overrides:
            return self._overrides[model]
        try:
            return self._unit_prices[model]
        except KeyError:
            price = self._lookup_unit_price(model)
        with self._lock:
            if len(self._unit_prices) < 1000:  # model names come from callers: stay bounded
                self._unit_prices[model] = price
        return price

    def _lookup_unit_price(self, model: str) -> ModelPrice | None:
        try:
            calc = calc_price(
                Usage(input_tokens=1_000_000, output_tokens=1_000_000),
                model_ref=model,
                provider_id=self._provider_id,
            )
        except LookupError:
            return None
        return ModelPrice(input_mtok=calc.input_price, output_mtok=calc.output_price)

    def quote(self, model: str, usage: TokenUsage, *, estimated: bool = False) -> PriceQuote:
        """The exact cost of ``usage`` on ``model``."""
        status: CostStatus = "estimated" if estimated else "priced"
        override = self._overrides.get(model)
        if override is not None:
            return PriceQuote(override.cost(usage), status, "override")
        found = self._find(model)
        if found is None:
            self._warn_unpriced(model)
            return PriceQuote(Decimal(0), "unpriced", "none")
        provider, info = found
        now = datetime.now(UTC)
        rates = self._linear_rates(provider, info, info.get_prices(now), now)
        if rates is not None:
            return PriceQuote(rates.cost(usage), status, "genai-prices")
        calc = info.calc_price(_gp_usage(usage), provider, genai_request_timestamp=now)
        return PriceQuote(Decimal(calc.total_price), status, "genai-prices")

    def _find(self, model: str) -> tuple[gp.Provider, gp.ModelInfo] | None:
        """The snapshot's provider and model for ``model`` (cached; None when unknown)."""
        try:
            return self._found[model]
        except KeyError:
            pass
        try:
            found: tuple[gp.Provider, gp.ModelInfo] | None = (
                data_snapshot.get_snapshot().find_provider_model(
                    model, None, self._provider_id, None
                )
            )
        except LookupError:
            found = None
        with self._lock:
            if len(self._found) < 1000:  # model names come from callers: stay bounded
                self._found[model] = found
        return found

    def _linear_rates(
        self,
        provider: gp.Provider,
        info: gp.ModelInfo,
        price: gp.ModelPrice,
        now: datetime,
    ) -> ModelPrice | None:
        try:
            return self._linear[id(price)][1]
        except KeyError:
            pass
        rates = _linear_rates_of(price)
        if rates is not None:
            for probe in _PROBES:
                exact = info.calc_price(_gp_usage(probe), provider, genai_request_timestamp=now)
                if rates.cost(probe) != exact.total_price:
                    rates = None
                    break
        with self._lock:
            if len(self._linear) < 1000:
                self._linear[id(price)] = (price, rates)
        return rates

    def _warn_unpriced(self, model: str) -> None:
        with self._lock:
            if model in self._warned:
                return
            self._warned.add(model)
        logger.warning(
            "No price known for model %r: its calls are recorded with cost_status=unpriced. "
            "Add it to PRICE_OVERRIDES to price it.",
            model,
        )


# Token counts on which a snapshot price is checked before its rates are trusted.
_PROBES = (
    TokenUsage(prompt_tokens=1_000_000, completion_tokens=0),
    TokenUsage(prompt_tokens=1_000_000, completion_tokens=0, cached_tokens=1_000_000),
    TokenUsage(prompt_tokens=0, completion_tokens=1_000_000, reasoning_tokens=500_000),
    TokenUsage(prompt_tokens=123_457, completion_tokens=9_876, cached_tokens=45_678),
    TokenUsage(prompt_tokens=1, completion_tokens=1),
)


def _gp_usage(usage: TokenUsage) -> Usage:
    return Usage(
        input_tokens=usage.prompt_tokens,
        cache_read_tokens=usage.cached_tokens,
        output_tokens=usage.completion_tokens,
    )


def _linear_rates_of(price: gp.ModelPrice) -> ModelPrice | None:
    """Plain per-MTok rates of a snapshot price, or None when it has tiers or lacks one."""
    values = {k: v for k, v in vars(price).items() if not k.startswith("_") and v is not None}
    if any(not isinstance(v, Decimal) for v in values.values()):
        return None  # tiered prices depend on the prompt size
    if "input_mtok" not in values or "output_mtok" not in values:
        return None
    return ModelPrice(
        input_mtok=values["input_mtok"],
        output_mtok=values["output_mtok"],
        cache_read_mtok=values.get("cache_read_mtok"),
    )
