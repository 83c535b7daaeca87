"""Telemetry for real: spans exported over OTLP gRPC to a receiver on loopback, /metrics parsed
with prometheus_client's own parser, and a dead collector that never reaches the caller."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from app.core.runtime import Runtime
from app.main import create_app
from app.observability import setup_telemetry
from app.simulator.config import ScriptRule
from app.simulator.server import SimulatorServer
from app.tracking.llm_client import LLMClient

MESSAGES = [{"role": "user", "content": "otlp canary prompt"}]


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace receiver built on opentelemetry-proto's service definition."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.received = threading.Event()

    def Export(self, request: Any, context: Any) -> Any:
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        self.received.set()
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def otlp_receiver() -> Iterator[tuple[Receiver, int]]:
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver, port
    server.stop(grace=None)


def _attrs(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        value = kv.value
        kind = value.WhichOneof("value")
        out[kv.key] = (
            getattr(value, kind)
            if kind != "array_value"
            else [getattr(v, v.WhichOneof("value")) for v in value.array_value.values]
        )
    return out


def test_llm_span_reaches_a_real_otlp_receiver(
    runtime_factory: Any, sim: SimulatorServer, otlp_receiver: tuple[Receiver, int]
) -> None:
    receiver, port = otlp_receiver
    runtime: Runtime = runtime_factory(
        enable_opentelemetry=True, otel_exporter_otlp_endpoint=f"http://127.0.0.1:{port}"
    )
    telemetry = setup_telemetry(runtime.settings)
    assert telemetry.tracer_provider is not None
    tracer = telemetry.tracer_provider.get_tracer("test")
    sim.state.add_scripts(
        [
            ScriptRule.model_validate(
                {"reply": {"content": "ok", "usage": {"prompt_tokens": 10, "completion_tokens": 5}}}
            )
        ]
    )

    LLMClient(
        task_id="t-otlp", user_id="u-otlp", agent="FixAgent", runtime=runtime, tracer=tracer
    ).chat_completion(messages=MESSAGES, model="gpt-4o-mini")
    telemetry.shutdown()

    assert receiver.received.wait(10)
    (span,) = [s for s in receiver.spans if s.name == "chat gpt-4o-mini"]
    attrs = _attrs(span)
    assert span.kind == span.SPAN_KIND_CLIENT
    assert attrs["gen_ai.usage.input_tokens"] == 10 and attrs["gen_ai.usage.output_tokens"] == 5
    assert attrs["llm.task_id"] == "t-otlp" and attrs["llm.user_id"] == "u-otlp"
    assert attrs["gen_ai.usage.cost"] == pytest.approx(10 * 0.15e-6 + 5 * 0.6e-6)
    assert "otlp canary prompt" not in str(attrs)


def test_an_unreachable_collector_never_reaches_the_caller(
    runtime_factory: Any, sim: SimulatorServer
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    runtime: Runtime = runtime_factory(
        enable_opentelemetry=True, otel_exporter_otlp_endpoint=f"http://127.0.0.1:{dead_port}"
    )
    telemetry = setup_telemetry(runtime.settings)
    assert telemetry.tracer_provider is not None
    client = LLMClient(runtime=runtime, tracer=telemetry.tracer_provider.get_tracer("test"))

    for _ in range(20):
        client.chat_completion(messages=MESSAGES, model="gpt-4o-mini")
    started = time.perf_counter()
    telemetry.shutdown()  # bounded even though every export fails

    assert time.perf_counter() - started < 30
    with runtime.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM llm_usage").scalar() == 20


async def test_metrics_endpoint_parses_and_counts_calls(
    runtime_factory: Any, sim: SimulatorServer
) -> None:
    settings = runtime_factory().settings
    app = create_app(settings.model_copy(update={"run_task_worker": False}))
    async with app.router.lifespan_context(app):
        runtime: Runtime = app.state.runtime
        LLMClient(agent="CodeAgent", runtime=runtime).chat_completion(
            messages=MESSAGES, model="gpt-4o-mini"
        )
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as client:
            text = (await client.get("/metrics")).text
            om = await client.get("/metrics", headers={"Accept": "application/openmetrics-text"})

    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = [s for s in families["llm_requests"].samples if s.labels.get("agent") == "CodeAgent"]
    assert requests and requests[0].labels["status"] == "success" and requests[0].value >= 1
    for name in (
        "llm_tokens",
        "llm_cost_usd",
        "llm_latency_seconds",
        "task_duration_seconds",
        "task_success",
        "active_tasks",
    ):
        assert name in families, name
    assert not any(
        "task_id" in s.labels or "user_id" in s.labels for f in families.values() for s in f.samples
    )
    assert om.headers["content-type"].startswith("application/openmetrics-text")
