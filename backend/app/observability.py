"""Prometheus metrics and OpenTelemetry set-up.

The metric objects below are the only module-level mutable state of the service. Labels are
bounded: model (capped, see ``model_label``), status, token type, agent, budget scope — never a
task or user id (one series per task is the documented Prometheus anti-pattern; ids live in the
``llm_usage`` rows and in spans, and exemplars carry the trace id).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram
from prometheus_client import generate_latest as generate_text
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from sqlalchemy import Engine

    from app.core.config import Settings

logger = logging.getLogger(__name__)

LLM_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TASK_DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)

LLM_REQUESTS = Counter("llm_requests_total", "LLM calls by outcome", ["model", "status", "agent"])
LLM_TOKENS = Counter(
    "llm_tokens_total",
    "Tokens by type (cached is part of prompt, reasoning part of completion)",
    ["model", "token_type", "agent"],
)
LLM_COST = Counter("llm_cost_usd_total", "Exact cost of LLM calls in USD", ["model", "agent"])
LLM_LATENCY = Histogram(
    "llm_latency_seconds", "LLM call latency", ["model"], buckets=LLM_LATENCY_BUCKETS
)
LLM_UNPRICED = Counter("llm_unpriced_calls_total", "Calls to models with no known price", ["model"])
LLM_RETRIES = Counter(
    "llm_retries_total", "HTTP attempts the SDK retried within one logical call", ["model"]
)
LLM_BUDGET_BLOCKED = Counter(
    "llm_budget_blocked_total", "Calls refused before reaching the provider", ["scope"]
)
LLM_BUDGET_SOFT_LIMIT = Counter(
    "llm_budget_soft_limit_total", "Soft budget thresholds crossed", ["scope"]
)
USAGE_SPOOLED = Counter(
    "llm_usage_spooled_total", "Usage rows written to the local spool (database unreachable)"
)
USAGE_SPOOL_PENDING = Gauge("llm_usage_spool_pending", "Usage rows waiting in the local spool")
TRACKING_ERRORS = Counter(
    "llm_tracking_errors_total",
    "Failures inside tracking, swallowed so the call goes on",
    ["stage"],
)
TASK_DURATION = Histogram(
    "task_duration_seconds", "Agent task duration", ["status"], buckets=TASK_DURATION_BUCKETS
)
TASK_SUCCESS = Counter("task_success_total", "Finished agent tasks by outcome", ["status"])
ACTIVE_TASKS = Gauge("active_tasks", "Agent tasks queued or running", ["status"])

MAX_MODEL_LABELS = 100
_model_labels: set[str] = set()
_model_labels_lock = threading.Lock()


def model_label(model: str) -> str:
    """The model's label value; after MAX_MODEL_LABELS distinct models, new ones are 'other'."""
    if model in _model_labels:
        return model
    with _model_labels_lock:
        if len(_model_labels) < MAX_MODEL_LABELS:
            _model_labels.add(model)
            return model
    return "other"


def agent_label(agent: str | None) -> str:
    return agent or "none"


def render_metrics(accept: str | None) -> tuple[bytes, str]:
    """The registry in OpenMetrics (with exemplars) when asked for, else the text format."""
    if accept and "application/openmetrics-text" in accept:
        return generate_openmetrics(REGISTRY), OPENMETRICS_TYPE  # type: ignore[no-untyped-call]
    return generate_text(REGISTRY), CONTENT_TYPE_LATEST


@dataclass
class Telemetry:
    """What ``setup_telemetry`` built; ``shutdown`` flushes spans and metrics."""

    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None

    def shutdown(self) -> None:
        if self.tracer_provider is not None:
            try:
                self.tracer_provider.force_flush(timeout_millis=5000)
                self.tracer_provider.shutdown()
            except Exception:  # a dead collector must not break shutdown
                logger.warning("Flushing spans at shutdown failed", exc_info=True)
        if self.meter_provider is not None:
            try:
                self.meter_provider.shutdown(timeout_millis=5000)  # exports what is left
            except Exception:
                logger.warning("Flushing metrics at shutdown failed", exc_info=True)


def setup_telemetry(
    settings: Settings,
    app: FastAPI | None = None,
    engine: Engine | None = None,
    span_exporter: SpanExporter | None = None,
    metric_reader: MetricReader | None = None,
) -> Telemetry:
    """With ENABLE_OPENTELEMETRY: OTLP export, FastAPI and SQLAlchemy auto-instrumentation.

    Export runs in a background batch processor with a bounded queue, so a collector that is
    down only drops spans; it never slows or fails a caller. Spans leave redacted
    (``RedactingSpanExporter``); ``span_exporter`` replaces OTLP (tests pass an in-memory one).
    The GenAI client metrics (``app.tracking.genai_metrics``) go through a ``MeterProvider``
    exported over OTLP every ``OTEL_METRIC_EXPORT_INTERVAL`` ms (the SDK's variable; 60 s by
    default); ``metric_reader`` replaces that reader.
    """
    if not settings.enable_opentelemetry:
        return Telemetry()
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from app.core.span_redaction import RedactingSpanExporter

    resource = Resource.create({SERVICE_NAME: settings.otel_service_name})
    provider = TracerProvider(resource=resource)
    if span_exporter is None:
        span_exporter = OTLPSpanExporter(endpoint=settings.otel_exporter_otlp_endpoint, timeout=5)
    exporter = RedactingSpanExporter(span_exporter, settings.secret_values)
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=4096))
    trace.set_tracer_provider(provider)
    _instrument(app, engine, provider)
    meter_provider = _meter_provider(settings, resource, metric_reader)
    logger.info("OpenTelemetry export to %s", settings.otel_exporter_otlp_endpoint)
    return Telemetry(tracer_provider=provider, meter_provider=meter_provider)


def _meter_provider(
    settings: Settings, resource: Any, reader: MetricReader | None
) -> MeterProvider | None:
    from opentelemetry import metrics
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    try:
        if reader is None:
            exporter = OTLPMetricExporter(endpoint=settings.otel_exporter_otlp_endpoint, timeout=5)
            reader = PeriodicExportingMetricReader(exporter)
        meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
        metrics.set_meter_provider(meter_provider)
    except Exception:  # metrics are an extra: their failure must not take spans down
        logger.warning("Could not set up OpenTelemetry metrics", exc_info=True)
        return None
    return meter_provider


def _instrument(app: FastAPI | None, engine: Engine | None, provider: Any) -> None:
    try:
        if app is not None:
            from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

            FastAPIInstrumentor.instrument_app(
                app, tracer_provider=provider, excluded_urls="/metrics,/health"
            )
        if engine is not None:
            from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

            SQLAlchemyInstrumentor().instrument(engine=engine, tracer_provider=provider)
    except Exception:
        logger.warning("Auto-instrumentation failed; LLM spans are still emitted", exc_info=True)
