"""The value written for each LLM call: one ``llm_usage`` row (and its rollup increment)."""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from app.core.money import PICO_PER_USD, pico_to_usd
from app.models import new_id


@dataclass(slots=True)
class UsageRecord:
    request_id: str
    model: str
    status: str  # success | error | blocked
    task_id: str | None = None
    user_id: str | None = None
    agent: str | None = None
    provider: str = "openai"
    operation: str = "chat"  # chat | responses | embeddings
    response_model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost_pico_usd: int = 0
    cost_status: str = "priced"
    # Provenance of the cost (``PriceQuote``): the price source's reference, the entry matched,
    # the variant or tier applied; and the service tier the call ran in.
    price_source: str | None = None
    price_entry: str | None = None
    price_tier: str | None = None
    service_tier: str | None = None
    latency_ms: float = 0.0
    is_stream: bool = False
    is_partial: bool = False
    attempts: int = 1
    finish_reason: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    flags: str | None = None
    trace_id: str | None = None
    span_id: str | None = None
    timestamp: datetime = field(default_factory=lambda: datetime.now(UTC))
    id: str = field(default_factory=new_id)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def cost_usd(self) -> Decimal:
        return pico_to_usd(self.cost_pico_usd)

    @property
    def cost_usd_float(self) -> float:
        """The cost as the float nearest to it (``float(cost_usd)``, without the Decimal):
        what metrics and span attributes carry."""
        return self.cost_pico_usd / PICO_PER_USD

    def row(self) -> dict[str, Any]:
        """Column values for ``llm_usage``."""
        values = dataclasses.asdict(self)
        values["total_tokens"] = self.total_tokens
        return values

    def to_json(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["timestamp"] = self.timestamp.isoformat()
        return values

    def to_wire(self) -> tuple[Any, ...]:
        """Every field's value in order, an aware timestamp as integer microseconds since the
        epoch: what the writer process is sent (``from_wire`` builds the record again), several
        times cheaper to pickle than the dataclass or a ``datetime`` with its time zone."""
        values = _FIELD_VALUES(self)
        stamp = self.timestamp
        if stamp.tzinfo is None:
            return values
        micros = (stamp - _EPOCH) // _MICROSECOND
        return (*values[:_TIMESTAMP], micros, *values[_TIMESTAMP + 1 :])

    @classmethod
    def from_wire(cls, values: tuple[Any, ...]) -> UsageRecord:
        record = cls(*values)
        if isinstance(record.timestamp, int):
            record.timestamp = _EPOCH + timedelta(microseconds=record.timestamp)
        return record

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UsageRecord:
        data = dict(data)
        data["timestamp"] = datetime.fromisoformat(data["timestamp"])
        return cls(**data)


_FIELD_VALUES = operator.attrgetter(*(f.name for f in dataclasses.fields(UsageRecord)))
_TIMESTAMP = [f.name for f in dataclasses.fields(UsageRecord)].index("timestamp")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
