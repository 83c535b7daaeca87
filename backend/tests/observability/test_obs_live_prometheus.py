"""A real Prometheus scraping a live ASA backend while known LLM calls are made.

The backend runs as its own process (``tests/support/live_backend.py``: the real app under uvicorn,
calls made through ``LLMClient`` inside it, answered by the built-in simulator), exporting spans to
an OTLP
receiver in this process. Prometheus scrapes it every second with the alert rules loaded. Then
every PromQL expression we publish (OBSERVABILITY.md, QUICKSTART_OBSERVABILITY.md, the dashboard,
the alert rules) is evaluated through the HTTP API, and the documented ones must give the values
the calls imply, checked against the ``llm_usage`` rows the same calls wrote.
"""

from __future__ import annotations

import json
import math
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from app.models import LLMUsage
from app.observability import LLM_LATENCY_BUCKETS
from tests.support.observability import (
    ALERTS_YML,
    PROMETHEUS_YML,
    SPAN_ATTRIBUTES,
    all_queries,
    documented_span_attributes,
    load_yaml,
    require_tool,
)

LIVE_BACKEND = Path(__file__).resolve().parents[1] / "support" / "live_backend.py"
BACKEND_DIR = Path(__file__).resolve().parents[2]
BACKEND_JOB = "asa-backend"
DEADLINE_SECONDS = 20.0

# gpt-4o answers slowly (scripted), gpt-4o-mini fast; two gpt-4o-mini calls fail with HTTP 500.
SLOW_MODEL, FAST_MODEL = "gpt-4o", "gpt-4o-mini"
SLOW_LATENCY_MS = 300
SCRIPTS = [
    {
        "name": "slow model",
        "match_model": f"^{SLOW_MODEL}$",
        "regex": True,
        "reply": {"content": "A slow answer.", "latency_ms": SLOW_LATENCY_MS},
    }
]


def _call(model: str, agent: str, n: int, fault: str | None = None) -> dict[str, Any]:
    return {
        "model": model,
        "agent": agent,
        "task_id": f"task-{n}",
        "user_id": "user-1",
        "fault": fault,
        "prompt": f"Fix the failing test number {n}.",
    }


# One call of each series first, so that Prometheus has seen every series before the measured
# calls move them (rate() needs two samples of a series to see an increase).
WARM_UP = [
    _call(FAST_MODEL, "fix_agent", 0),
    _call(FAST_MODEL, "fix_agent", 1, fault="500"),
    _call(SLOW_MODEL, "code_agent", 2),
]
MEASURED = [
    *(
        _call(FAST_MODEL, "fix_agent", 10 + i, fault="500" if i in (3, 7) else None)
        for i in range(10)
    ),
    *(_call(SLOW_MODEL, "code_agent", 20 + i) for i in range(5)),
]
MEASURED_SUCCESS_RATIO = sum(1 for c in MEASURED if not c["fault"]) / len(MEASURED)


def _wait_for(what: str, check: Callable[[], Any], timeout: float = DEADLINE_SECONDS) -> Any:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            last_error, result = exc, None
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last error: {last_error!r})")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- the OTLP receiver ------------------------------------------------------------------------


class _TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Collects the trace ids of the spans exported to it, and the attribute keys of LLM spans."""

    def __init__(self) -> None:
        self.trace_ids: set[str] = set()
        self.span_names: list[str] = []
        self.llm_span_attributes: list[set[str]] = []
        self._lock = threading.Lock()

    def Export(  # the gRPC method name
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.trace_ids.add(span.trace_id.hex())
                        self.span_names.append(span.name)
                        if span.name.startswith("chat "):
                            self.llm_span_attributes.append({a.key for a in span.attributes})
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def otlp_receiver() -> Iterator[tuple[_TraceReceiver, int]]:
    receiver = _TraceReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver, port
    server.stop(grace=None)


# --- the backend ------------------------------------------------------------------------------


@dataclass
class LiveBackend:
    process: subprocess.Popen[str]
    lines: queue.Queue[str]
    port: int
    database_path: Path

    def send(self, command: dict[str, Any], timeout: float = DEADLINE_SECONDS) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        answer: dict[str, Any] = json.loads(self.lines.get(timeout=timeout))
        return answer

    def calls(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = self.send({"op": "calls", "calls": calls})["results"]
        return results

    def rows(self) -> list[LLMUsage]:
        """The ``llm_usage`` rows the backend wrote: the ledger the metrics must agree with."""
        engine = create_engine(f"sqlite:///{self.database_path}")
        try:
            with Session(engine) as session:
                return list(session.scalars(select(LLMUsage)))
        finally:
            engine.dispose()


@pytest.fixture
def live_backend(
    tmp_path: Path, otlp_receiver: tuple[_TraceReceiver, int]
) -> Iterator[LiveBackend]:
    _receiver, otlp_port = otlp_receiver
    database_path = tmp_path / "asa.db"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(BACKEND_DIR),  # the same app package as this test's
        "DATABASE_URL": f"sqlite:///{database_path}",
        "SPOOL_DIR": str(tmp_path / "spool"),
        # no OPENAI_API_KEY: the built-in simulator answers
        "OPENAI_MAX_RETRIES": "0",
        "SIMULATOR_LATENCY_MS": "20",
        "ENABLE_OPENTELEMETRY": "true",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
        "OTEL_SERVICE_NAME": "asa-backend",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    # cwd: an empty directory, so no developer's .env is read
    process = subprocess.Popen(
        [sys.executable, str(LIVE_BACKEND)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "backend.log", "w"),  # noqa: SIM115 - closed with the process
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        deadline = time.monotonic() + DEADLINE_SECONDS
        ready: dict[str, Any] = {}
        while not ready and time.monotonic() < deadline and process.poll() is None:
            try:
                ready = json.loads(lines.get(timeout=0.2))
            except queue.Empty:
                continue
        if ready.get("event") != "ready":
            pytest.fail(f"backend did not start:\n{(tmp_path / 'backend.log').read_text()}")
        backend = LiveBackend(process, lines, ready["port"], database_path)
        backend.send({"op": "scripts", "rules": SCRIPTS})
        yield backend
    finally:
        if process.poll() is None:
            try:
                assert process.stdin is not None
                process.stdin.write(json.dumps({"op": "stop"}) + "\n")
                process.stdin.close()
                process.wait(timeout=15)
            except (OSError, subprocess.TimeoutExpired):
                process.kill()
                process.wait(timeout=5)


# --- Prometheus -------------------------------------------------------------------------------


@dataclass
class LivePrometheus:
    url: str
    http: httpx.Client

    def get(self, path: str, **params: Any) -> Any:
        return self.http.get(f"{self.url}{path}", params=params).json()

    def query(self, expr: str) -> dict[str, Any]:
        """The API's whole answer for an instant query at the current time."""
        answer: dict[str, Any] = self.get("/api/v1/query", query=expr)
        return answer

    def vector(self, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
        answer = self.query(expr)
        assert answer["status"] == "success", (expr, answer)
        result = answer["data"]["result"]
        if answer["data"]["resultType"] == "scalar":
            return {(): float(result[1])}
        return {
            tuple(sorted(sample["metric"].items())): float(sample["value"][1]) for sample in result
        }

    def scalar(self, expr: str) -> float:
        (value,) = self.vector(expr).values()
        return value


def _prometheus_config(backend_port: int) -> dict[str, Any]:
    """prometheus.yml, pointed at the live backend and sped up; the same job and rules."""
    config: dict[str, Any] = load_yaml(PROMETHEUS_YML)
    config["global"] = {
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "evaluation_interval": "1s",
    }
    config["rule_files"] = [str(ALERTS_YML)]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == BACKEND_JOB]
    for static in job["static_configs"]:
        static["targets"] = [f"127.0.0.1:{backend_port}"]
    config["scrape_configs"] = [job]
    return config


@pytest.fixture
def prometheus_server(tmp_path: Path) -> Iterator[Callable[[int], LivePrometheus]]:
    binary = require_tool("prometheus")
    processes: list[subprocess.Popen[bytes]] = []
    http = httpx.Client(timeout=10)

    def start(backend_port: int) -> LivePrometheus:
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(json.dumps(_prometheus_config(backend_port)))  # JSON is YAML
        port = _free_port()
        log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed with the process
        processes.append(
            subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--enable-feature=exemplar-storage",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        url = f"http://127.0.0.1:{port}"
        _wait_for("Prometheus to be ready", lambda: http.get(f"{url}/-/ready").status_code == 200)
        return LivePrometheus(url, http)

    yield start
    http.close()
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


# --- the test ---------------------------------------------------------------------------------


def _rules_in_file() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS_YML)["groups"] for rule in group["rules"]]


def _epoch(stamp: str) -> float:
    """RFC 3339 with nanoseconds (Prometheus's format) to seconds since the epoch."""
    head, _, fraction = stamp.rstrip("Z").partition(".")
    seconds = datetime.fromisoformat(head + "+00:00").timestamp()
    return seconds + (float("0." + fraction.split("+")[0]) if fraction else 0.0)


def _bucket_bounds(latencies: list[float]) -> tuple[float, float]:
    """The lowest lower bound and highest upper bound of the buckets these latencies fall in."""
    bounds = [0.0, *LLM_LATENCY_BUCKETS, math.inf]
    lower = max(b for b in bounds if b < min(latencies))
    upper = min(b for b in bounds if b >= max(latencies))
    return lower, upper


def test_every_published_query_runs_on_live_metrics_and_gives_the_known_values(
    live_backend: LiveBackend,
    prometheus_server: Callable[[int], LivePrometheus],
    otlp_receiver: tuple[_TraceReceiver, int],
) -> None:
    receiver, _port = otlp_receiver
    assert all(
        result["ok"] == (call["fault"] is None)
        for call, result in zip(WARM_UP, live_backend.calls(WARM_UP), strict=True)
    )
    prometheus = prometheus_server(live_backend.port)
    _wait_for(
        "the backend target to be up", lambda: prometheus.scalar(f'up{{job="{BACKEND_JOB}"}}') == 1
    )
    _wait_for(
        "the warm-up calls to be scraped",
        lambda: prometheus.scalar("sum(llm_requests_total)") == len(WARM_UP),
    )
    time.sleep(1.5)  # at least one more scrape of the warm-up values
    results = live_backend.calls(MEASURED)
    assert [r["ok"] for r in results] == [c["fault"] is None for c in MEASURED]
    assert {r["error"] for r in results if not r["ok"]} == {"InternalServerError"}
    calls_done = time.time()
    total_calls = len(WARM_UP) + len(MEASURED)
    _wait_for(
        "the measured calls to be scraped",
        lambda: prometheus.scalar("sum(llm_requests_total)") == total_calls,
    )
    scraped = time.time()

    def rules_evaluated_on_the_calls() -> bool:
        answer = prometheus.get("/api/v1/rules")
        rules = [rule for group in answer["data"]["groups"] for rule in group["rules"]]
        assert all(rule["health"] != "err" for rule in rules), rules
        stamps = [rule["lastEvaluation"] for rule in rules]
        return len(rules) == len(_rules_in_file()) and all(
            _epoch(stamp) > scraped for stamp in stamps
        )

    _wait_for("the alert rules to be evaluated", rules_evaluated_on_the_calls)

    # 1. every published expression evaluates without an error
    failures = []
    for query in all_queries():
        answer = prometheus.query(query.expr)
        if answer.get("status") != "success":
            failures.append(f"{query.source}: {answer.get('error')}")
    assert not failures, "\n".join(failures)

    rows = live_backend.rows()
    assert len(rows) == total_calls

    # 2. the documented queries give the values the calls imply
    ledger_cost = sum(row.cost_pico_usd for row in rows) / 10**12
    assert ledger_cost > 0
    assert prometheus.scalar("sum(llm_cost_usd_total)") == pytest.approx(ledger_cost, rel=1e-9)

    per_second = prometheus.vector("rate(llm_requests_total[1m])")
    moved = {(c["model"], "error" if c["fault"] else "success", c["agent"]) for c in MEASURED}
    for labels, value in per_second.items():
        series = dict(labels)
        if (series["model"], series["status"], series["agent"]) in moved:
            assert value > 0, series

    for expr in (
        "histogram_quantile(0.95, rate(llm_latency_seconds_bucket[5m]))",
        "histogram_quantile(0.95, sum by (le, model) (rate(llm_latency_seconds_bucket[5m])))",
    ):
        p95 = {dict(labels)["model"]: value for labels, value in prometheus.vector(expr).items()}
        assert set(p95) == {FAST_MODEL, SLOW_MODEL}, expr
        for model, value in p95.items():
            lower, upper = _bucket_bounds([r.latency_ms / 1000 for r in rows if r.model == model])
            assert lower <= value <= upper, (expr, model, value, lower, upper)
        # every call to the slow model takes >= 300 ms, so its p95 lies in a bucket above 0.25 s
        assert p95[SLOW_MODEL] > 0.25, expr

    seed_success_rate = prometheus.vector(
        'rate(llm_requests_total{status="success"}[5m]) / rate(llm_requests_total[5m])'
    )
    assert seed_success_rate
    assert set(seed_success_rate.values()) == {1.0}  # per series, as OBSERVABILITY.md warns
    success_ratio = prometheus.scalar(
        'sum(rate(llm_requests_total{status="success"}[5m])) / sum(rate(llm_requests_total[5m]))'
    )
    assert success_ratio == pytest.approx(MEASURED_SUCCESS_RATIO, abs=0.03)

    # 3. the counters agree with the ledger, row for row
    by_status = {
        dict(k)["status"]: v
        for k, v in prometheus.vector("sum by (status) (llm_requests_total)").items()
    }
    assert by_status == {s: float(n) for s, n in Counter(r.status for r in rows).items()}
    tokens = {
        dict(k)["token_type"]: v
        for k, v in prometheus.vector("sum by (token_type) (llm_tokens_total)").items()
    }
    assert tokens["prompt"] == sum(r.prompt_tokens for r in rows)
    assert tokens["completion"] == sum(r.completion_tokens for r in rows)

    # 4. the alerts react to the live data: 2 of 10 calls to the fast model failed (over the 5%
    # of LLMErrorRatioHigh, pending for its 10 minutes), and the backend is up
    alerts = prometheus.get("/api/v1/alerts")["data"]["alerts"]
    active = {(a["labels"]["alertname"], a["labels"].get("model"), a["state"]) for a in alerts}
    assert ("LLMErrorRatioHigh", FAST_MODEL, "pending") in active
    assert ("LLMErrorRatioHigh", SLOW_MODEL, "pending") not in active
    assert "ASABackendDown" not in {name for name, _model, _state in active}

    # 5. latency exemplars carry trace ids of the calls, and those traces were exported
    answer = prometheus.get(
        "/api/v1/query_exemplars",
        query="llm_latency_seconds_bucket",
        start=calls_done - 120,
        end=time.time(),
    )
    exemplar_ids = {
        exemplar["labels"]["trace_id"]
        for series in answer["data"]
        for exemplar in series["exemplars"]
    }
    assert exemplar_ids
    assert exemplar_ids <= {row.trace_id for row in rows}
    _wait_for("the spans to be exported", lambda: exemplar_ids <= receiver.trace_ids)
    assert f"chat {SLOW_MODEL}" in receiver.span_names

    # 6. the LLM spans carry the documented attributes, and only those
    _wait_for(
        "every LLM span to be exported",
        lambda: len(receiver.llm_span_attributes) == total_calls,
    )
    seen = set().union(*receiver.llm_span_attributes)
    assert seen <= documented_span_attributes()
    assert set(SPAN_ATTRIBUTES) <= seen
