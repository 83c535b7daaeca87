"""Exact prices for LLM calls.

Prices come from genai-prices' bundled snapshot (never downloaded at run time), except for
models in the local override table (``PRICE_OVERRIDES``), which wins. OpenAI reports
``cached_tokens`` as part of ``prompt_tokens`` and ``reasoning_tokens`` as part of
``completion_tokens``: cached tokens are priced at the cache-read rate instead of the input
rate, and reasoning tokens at the output rate, once — never on top of the totals that hold them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from genai_prices import Usage, calc_price

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
        try:
            calc = calc_price(
                Usage(
                    input_tokens=usage.prompt_tokens,
                    cache_read_tokens=usage.cached_tokens,
                    output_tokens=usage.completion_tokens,
                ),
                model_ref=model,
                provider_id=self._provider_id,
            )
        except LookupError:
            self._warn_unpriced(model)
            return PriceQuote(Decimal(0), "unpriced", "none")
        return PriceQuote(Decimal(calc.total_price), status, "genai-prices")

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
