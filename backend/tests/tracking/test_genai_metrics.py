"""GenAI client metrics (conventions v1.41.1): in-memory, and through a real OTLP receiver."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import openai
import pytest
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

from app.core.runtime import Runtime
from app.observability import setup_telemetry
from app.simulator.config import ScriptRule
from app.simulator.server import SimulatorServer
from app.tracking.llm_client import LLMClient

TOKEN_BUCKETS = [
    1,
    4,
    16,
    64,
    256,
    1024,
    4096,
    16384,
    65536,
    262144,
    1048576,
    4194304,
    16777216,
    67108864,
]
DURATION_BUCKETS = [
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
]


def script_usage(sim: SimulatorServer, prompt: int, completion: int) -> None:
    rule = {
        "reply": {
            "content": "ok",
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
        }
    }
    sim.state.add_scripts([ScriptRule.model_validate(rule)])


def points(
    reader: InMemoryMetricReader, name: str
) -> list[tuple[dict[str, Any], HistogramDataPoint]]:
    data = reader.get_metrics_data()
    found = []
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    found += [(dict(p.attributes or {}), p) for p in metric.data.data_points]  # type: ignore[union-attr]
    return found


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def metered(runtime: Runtime, reader: InMemoryMetricReader) -> Callable[..., LLMClient]:
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    return lambda **kw: LLMClient(runtime=runtime, meter=meter, **kw)


def test_token_usage_and_duration_carry_the_spec_attributes_and_buckets(
    metered: Callable[..., LLMClient], reader: InMemoryMetricReader, sim: SimulatorServer
) -> None:
    script_usage(sim, 1200, 80)

    metered().chat_completion(
        messages=[{"role": "user", "content": "hi"}], model="claude-sonnet-4-5"
    )

    base = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "anthropic",
        "gen_ai.request.model": "claude-sonnet-4-5",
        "gen_ai.response.model": "claude-sonnet-4-5",
        "server.address": "127.0.0.1",
        "server.port": sim.port,
    }
    tokens = {
        attrs["gen_ai.token.type"]: (attrs, p)
        for attrs, p in points(reader, "gen_ai.client.token.usage")
    }
    assert sorted(tokens) == ["input", "output"]
    for token_type, value in (("input", 1200), ("output", 80)):
        attrs, point = tokens[token_type]
        assert attrs == {**base, "gen_ai.token.type": token_type}
        assert (point.count, point.sum) == (1, value)
        assert list(point.explicit_bounds) == TOKEN_BUCKETS
    ((attrs, point),) = points(reader, "gen_ai.client.operation.duration")
    assert attrs == base
    assert point.count == 1 and 0 < point.sum < 10
    assert list(point.explicit_bounds) == DURATION_BUCKETS


def test_a_failed_call_has_a_duration_with_error_type_and_no_token_usage(
    metered: Callable[..., LLMClient], reader: InMemoryMetricReader, sim: SimulatorServer
) -> None:
    sim.state.schedule_fault("500")
    with pytest.raises(openai.InternalServerError):
        metered().chat_completion(messages=[{"role": "user", "content": "x"}], model="gpt-4o-mini")

    ((attrs, point),) = points(reader, "gen_ai.client.operation.duration")
    assert attrs["error.type"] == "InternalServerError" and point.count == 1
    assert "gen_ai.response.model" not in attrs
    assert points(reader, "gen_ai.client.token.usage") == []


def test_embeddings_count_input_tokens_only(
    metered: Callable[..., LLMClient], reader: InMemoryMetricReader, sim: SimulatorServer
) -> None:
    response = metered().embeddings.create(model="text-embedding-3-small", input="embed")

    ((attrs, point),) = points(reader, "gen_ai.client.token.usage")
    assert attrs["gen_ai.token.type"] == "input" and attrs["gen_ai.operation.name"] == "embeddings"
    assert point.sum == response.usage.prompt_tokens


def test_a_stream_without_usage_records_no_token_usage(
    metered: Callable[..., LLMClient], reader: InMemoryMetricReader, sim: SimulatorServer
) -> None:
    stream = metered().chat_completion(
        messages=[{"role": "user", "content": "x"}],
        model="gpt-4o-mini",
        stream=True,
        stream_options={"include_usage": False},
    )
    list(stream)

    assert points(reader, "gen_ai.client.token.usage") == []  # estimates are not reported
    assert len(points(reader, "gen_ai.client.operation.duration")) == 1


class MetricsReceiver(metrics_service_pb2_grpc.MetricsServiceServicer):
    """A real OTLP/gRPC metrics receiver on opentelemetry-proto's service definition."""

    def __init__(self) -> None:
        self.metrics: list[Any] = []
        self.received = threading.Event()

    def Export(self, request: Any, context: Any) -> Any:
        for resource_metrics in request.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                self.metrics.extend(scope_metrics.metrics)
        self.received.set()
        return metrics_service_pb2.ExportMetricsServiceResponse()


@pytest.fixture
def metrics_receiver() -> Iterator[tuple[MetricsReceiver, int]]:
    receiver = MetricsReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver, port
    server.stop(grace=None)


def _otlp_attrs(point: Any) -> dict[str, Any]:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in point.attributes}


def test_the_metrics_reach_a_real_otlp_receiver(
    runtime_factory: Callable[..., Runtime],
    sim: SimulatorServer,
    metrics_receiver: tuple[MetricsReceiver, int],
) -> None:
    receiver, port = metrics_receiver
    runtime = runtime_factory(
        enable_opentelemetry=True, otel_exporter_otlp_endpoint=f"http://127.0.0.1:{port}"
    )
    telemetry = setup_telemetry(runtime.settings)
    assert telemetry.meter_provider is not None
    script_usage(sim, 300, 40)
    client = LLMClient(runtime=runtime, meter=telemetry.meter_provider.get_meter("otlp-test"))

    client.chat_completion(messages=[{"role": "user", "content": "hi"}], model="gpt-4o-mini")
    telemetry.shutdown()  # exports what the periodic reader holds

    assert receiver.received.wait(10)
    by_name = {m.name: m for m in receiver.metrics}
    usage = by_name["gen_ai.client.token.usage"]
    assert usage.unit == "{token}"
    sums = {_otlp_attrs(p)["gen_ai.token.type"]: p.sum for p in usage.histogram.data_points}
    assert sums == {"input": 300, "output": 40}
    assert list(usage.histogram.data_points[0].explicit_bounds) == TOKEN_BUCKETS
    duration = by_name["gen_ai.client.operation.duration"]
    assert duration.unit == "s"
    (point,) = duration.histogram.data_points
    assert _otlp_attrs(point)["gen_ai.provider.name"] == "openai"
    assert list(point.explicit_bounds) == DURATION_BUCKETS
