"""Prometheus metrics and OpenTelemetry set-up.

The metric objects below are the only module-level mutable state of the service. Labels are
bounded: model (capped, see ``model_label``), status, token type, agent, budget scope — never a
task or user id (one series per task is the documented Prometheus anti-pattern; ids live in the
``llm_usage`` rows and in spans, and exemplars carry the trace id).
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Metric,
)
from prometheus_client import generate_latest as generate_text
from prometheus_client import values as prometheus_values
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

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
# Gauges say how the processes of one server (``PROMETHEUS_MULTIPROC_DIR``) are merged: a
# count of this process's own things adds up (``livesum``); a value several processes read
# from a shared place (the spool directory, the database) is reported once (``livemax``).
USAGE_SPOOL_PENDING = Gauge(
    "llm_usage_spool_pending",
    "Usage rows waiting in the local spool",
    multiprocess_mode="livemax",
)
TRACKING_ERRORS = Counter(
    "llm_tracking_errors_total",
    "Failures inside tracking, swallowed so the call goes on",
    ["stage"],
)
DATABASE_BREAKER_OPEN = Gauge(
    "asa_database_breaker_open",
    "1 while the database circuit breaker is open (rows spooled, no database waits), else 0",
    multiprocess_mode="livemax",
)
DATABASE_BREAKER_TRIPS = Counter(
    "asa_database_breaker_trips_total", "Times the database circuit breaker opened on an outage"
)
TASK_DURATION = Histogram(
    "task_duration_seconds", "Agent task duration", ["status"], buckets=TASK_DURATION_BUCKETS
)
TASK_SUCCESS = Counter("task_success_total", "Finished agent tasks by outcome", ["status"])
ACTIVE_TASKS = Gauge(
    "active_tasks", "Agent tasks queued or running", ["status"], multiprocess_mode="livesum"
)
# ``active_tasks{status="queued"}`` is the queue's length in the database, which every worker
# process reads: with several processes it is kept here (newest reading wins) and served as
# that label of ``active_tasks`` (``_ServerCollector``), never summed. Not registered: it
# lives only in the multiprocess files.
_TASKS_QUEUED_SHARED = Gauge(
    "asa_internal_tasks_queued",
    "The queue's length as last read by a worker process",
    multiprocess_mode="livemostrecent",
    registry=None,
)


class BoundedLabels:
    """The values of one label dimension: at most ``limit`` distinct ones per process, later new
    ones become ``other`` (the series stay bounded; the ledger keeps the real values)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return "other"


MAX_MODEL_LABELS = 100
MAX_AGENT_LABELS = 50  # GATEWAY_MAX_AGENT_LABELS: the gateway lets clients name their agents
model_label = BoundedLabels(MAX_MODEL_LABELS)
"""The model's label value; after MAX_MODEL_LABELS distinct models, new ones are 'other'."""
agent_labels = BoundedLabels(MAX_AGENT_LABELS)


M = TypeVar("M", bound=MetricWrapperBase)
_CHILDREN: dict[tuple[object, tuple[str, ...]], Any] = {}


def labelled(metric: M, *values: str) -> M:
    """``metric.labels(*values)``, kept: every tracked call counts itself in a handful of
    series, and the label values are bounded (``model_label``, ``agent_label``), so the children
    are looked up in one dict rather than validated and found again per call."""
    key = (metric, values)
    child = _CHILDREN.get(key)
    if child is None:
        child = _CHILDREN[key] = metric.labels(*values)
    return child


def agent_label(agent: str | None) -> str:
    """The agent's label value (``none`` without one), bounded like the models'."""
    return agent_labels(agent or "none")


def set_queued_tasks(count: int) -> None:
    """``active_tasks{status="queued"}``: the queue's length a worker just read."""
    if MULTIPROCESS:
        _TASKS_QUEUED_SHARED.set(count)
    else:
        ACTIVE_TASKS.labels("queued").set(count)


def render_metrics(accept: str | None, multiprocess_dir: Path | None = None) -> tuple[bytes, str]:
    """The metrics in OpenMetrics (with exemplars) when asked for, else the text format.

    With ``PROMETHEUS_MULTIPROC_DIR`` (``multiprocess_dir``) they are the whole server's: the
    files of every process of the server merged (prometheus_client's multiprocess mode, which
    keeps no exemplars); else this process's registry.
    """
    registry: CollectorRegistry = REGISTRY
    if MULTIPROCESS and multiprocess_dir is not None:
        registry = CollectorRegistry(auto_describe=True)
        registry.register(_ServerCollector(multiprocess_dir))
    if accept and "application/openmetrics-text" in accept:
        return generate_openmetrics(registry), OPENMETRICS_TYPE  # type: ignore[no-untyped-call]
    return generate_text(registry), CONTENT_TYPE_LATEST


# -- several processes, one /metrics (prometheus_client's multiprocess mode) -------------------
#
# Chosen over one port per process: a server run with `uvicorn --workers N` (or gunicorn) has
# one address, and a scrape of it reaches one process picked by the kernel; with the values of
# every process kept in files in one directory, any process answers for the whole server, and
# Prometheus needs one target per server, not per process it cannot address.

# prometheus_client decides once, when it is first imported, from PROMETHEUS_MULTIPROC_DIR in
# the process's environment; this is that decision.
MULTIPROCESS: bool = prometheus_values.ValueClass is not prometheus_values.MutexValue


class MetricsModeError(RuntimeError):
    """PROMETHEUS_MULTIPROC_DIR is unusable, or reached the settings but not prometheus_client."""


def check_metrics_mode(settings: Settings) -> None:
    """Refuse to start with a multiprocess set-up that would serve wrong metrics, and drop the
    files that processes of this server which died left for their live gauges."""
    directory = settings.prometheus_multiproc_dir
    if directory is None and not MULTIPROCESS:
        return
    if directory is None:
        raise MetricsModeError("PROMETHEUS_MULTIPROC_DIR is set but empty")
    if not MULTIPROCESS:
        raise MetricsModeError(
            "PROMETHEUS_MULTIPROC_DIR must be in the process's environment when it starts "
            "(prometheus_client reads it on import), not only in a .env file"
        )
    if not directory.is_dir() or not os.access(directory, os.W_OK | os.X_OK):
        raise MetricsModeError(f"PROMETHEUS_MULTIPROC_DIR={directory} is not a writable directory")
    forget_dead_processes(directory)


def forget_dead_processes(directory: Path) -> list[int]:
    """Remove the live-gauge files of processes that no longer run; returns their pids.

    Their counters and histograms stay: what a process counted before it died is part of the
    server's totals until the directory is emptied, before the next start of the server.
    """
    dead: set[int] = set()
    for path in directory.glob("gauge_live*_*.db"):
        pid_text = path.stem.rsplit("_", 1)[-1]
        if pid_text.isdigit() and not _process_runs(int(pid_text)):
            dead.add(int(pid_text))
    for pid in dead:
        mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
    return sorted(dead)


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class _ServerCollector(Collector):
    """Every process's values merged, live gauges of dead processes dropped, and the queue's
    length served as ``active_tasks{status="queued"}``."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    def collect(self) -> Iterable[Metric]:
        forget_dead_processes(self._directory)
        files = [str(p) for p in self._directory.glob("*.db")]
        families = list(MultiProcessCollector.merge(files, accumulate=True))  # type: ignore[no-untyped-call]
        queued = [f for f in families if f.name == _TASKS_QUEUED_SHARED._name]
        families = [f for f in families if f.name != _TASKS_QUEUED_SHARED._name]
        if queued and queued[0].samples:
            active = next((f for f in families if f.name == ACTIVE_TASKS._name), None)
            if active is None:
                active = Metric(ACTIVE_TASKS._name, ACTIVE_TASKS._documentation, "gauge")
                families.append(active)
            value = queued[0].samples[0].value
            active.samples.append(Sample(ACTIVE_TASKS._name, {"status": "queued"}, value))
        return families


class _SilentHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class MetricsServer:
    """``GET /metrics`` of a process that serves no API (``asa worker --metrics-port``), with
    the API's rules: ``METRICS_TOKEN`` as a bearer token when set, the server's merged metrics
    in multiprocess mode."""

    def __init__(
        self, host: str, port: int, token: str | None, multiprocess_dir: Path | None
    ) -> None:
        self._token = token
        self._multiprocess_dir = multiprocess_dir
        self._server = make_server(
            host, port, self._app, server_class=_ThreadingWSGIServer, handler_class=_SilentHandler
        )
        self.port: int = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="asa-metrics-server", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _app(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"Not found: metrics are at /metrics\n"]
        if self._token is not None:
            sent = str(environ.get("HTTP_AUTHORIZATION", ""))
            if not hmac.compare_digest(sent.encode(), f"Bearer {self._token}".encode()):
                start_response("401 Unauthorized", [("Content-Type", "text/plain")])
                return [b"/metrics requires the METRICS_TOKEN bearer token.\n"]
        body, content_type = render_metrics(environ.get("HTTP_ACCEPT"), self._multiprocess_dir)
        start_response("200 OK", [("Content-Type", content_type)])
        return [body]


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
    from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from app.core.span_redaction import RedactingSpanExporter

    resource = Resource.create({SERVICE_NAME: settings.otel_service_name})
    if SERVICE_INSTANCE_ID not in resource.attributes:
        # One per process: with several processes (uvicorn --workers, asa worker on other
        # machines) each exports its own cumulative metric streams, which a backend must not
        # take for one stream that keeps resetting; it sums them across instances.
        resource = resource.merge(Resource({SERVICE_INSTANCE_ID: str(uuid.uuid4())}))
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
