"""The GenAI client metrics of the OpenTelemetry conventions (v1.41.1), beside Prometheus.

``gen_ai.client.operation.duration`` (histogram, ``s``) gets one value per call that reached
the provider; ``gen_ai.client.token.usage`` (histogram, ``{token}``) one value per token type
(``input``, ``output``) the provider reported (none when it reported no usage: the conventions
forbid guessing). Both carry ``gen_ai.operation.name``, ``gen_ai.provider.name``,
``gen_ai.request.model``, ``gen_ai.response.model``, ``server.address``/``server.port`` and, for
a failed call, ``error.type``; bucket boundaries are the conventions' advice. They go through an
OpenTelemetry ``MeterProvider`` (``app.observability.setup_telemetry`` exports it over OTLP when
OpenTelemetry is on); the seed's Prometheus metrics are unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider

from app.tracking import semconv as sc

METER_NAME = "app.tracking"


class GenAIMetrics:
    """The two instruments of one meter."""

    def __init__(self, meter: Meter) -> None:
        self.token_usage = meter.create_histogram(
            sc.METRIC_CLIENT_TOKEN_USAGE,
            unit=sc.TOKEN_USAGE_UNIT,
            description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=sc.TOKEN_USAGE_BUCKETS,
        )
        self.duration = meter.create_histogram(
            sc.METRIC_CLIENT_OPERATION_DURATION,
            unit=sc.DURATION_UNIT,
            description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=sc.DURATION_BUCKETS,
        )

    def record(
        self,
        *,
        operation: str,
        provider: str,
        request_model: str,
        response_model: str | None,
        address: str | None,
        port: int | None,
        duration_s: float,
        error_type: str | None,
        input_tokens: int | None,
        output_tokens: int | None,
    ) -> None:
        attrs: dict[str, Any] = {
            sc.GEN_AI_OPERATION_NAME: operation,
            sc.GEN_AI_PROVIDER_NAME: provider,
            sc.GEN_AI_REQUEST_MODEL: request_model,
        }
        if response_model:
            attrs[sc.GEN_AI_RESPONSE_MODEL] = response_model
        if address:
            attrs[sc.SERVER_ADDRESS] = address
            if port is not None:
                attrs[sc.SERVER_PORT] = port
        duration_attrs = attrs if error_type is None else {**attrs, sc.ERROR_TYPE: error_type}
        self.duration.record(duration_s, duration_attrs)
        if input_tokens is not None:
            self.token_usage.record(
                input_tokens, {**attrs, sc.GEN_AI_TOKEN_TYPE: sc.TOKEN_TYPE_INPUT}
            )
        if output_tokens is not None:
            self.token_usage.record(
                output_tokens, {**attrs, sc.GEN_AI_TOKEN_TYPE: sc.TOKEN_TYPE_OUTPUT}
            )


# One set of instruments per meter (and per global provider): clients are made per task,
# instruments once. A cache of metric objects, like the Prometheus ones in app.observability;
# it holds a handful of entries at most.
_cache: dict[int, tuple[object, GenAIMetrics]] = {}
_lock = threading.Lock()


def _cached(owner: object, build: Callable[[], GenAIMetrics]) -> GenAIMetrics:
    found = _cache.get(id(owner))
    if found is not None and found[0] is owner:
        return found[1]
    with _lock:
        found = _cache.get(id(owner))
        if found is None or found[0] is not owner:
            if len(_cache) >= 64:
                _cache.clear()
            found = (owner, build())
            _cache[id(owner)] = found
    return found[1]


def genai_metrics(meter: Meter | None = None) -> GenAIMetrics | None:
    """The instruments of ``meter``, or of the global meter provider when it is an SDK one;
    None when metrics go nowhere (no provider installed: OpenTelemetry is off)."""
    if meter is not None:
        return _cached(meter, lambda: GenAIMetrics(meter))
    provider = metrics.get_meter_provider()
    if not isinstance(provider, SdkMeterProvider):
        return None
    return _cached(provider, lambda: GenAIMetrics(provider.get_meter(METER_NAME)))
