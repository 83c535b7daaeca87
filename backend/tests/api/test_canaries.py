"""Canaries: a provider key, an API key and a prompt pushed through every path, then searched for.

The service runs with a canary provider key (shaped like nothing the patterns know, so only the
configured-secret masking can catch it) and DEBUG logging; calls carry a canary prompt through
success, streaming, provider errors (500 after a retry, 400, a provider that echoes the key and
the whole request back) and budget refusals; spans (LLM calls, HTTP requests, SQL) go to an
in-memory exporter through the real telemetry set-up. Then the logs, the exported spans, every
text column of every table, ``/metrics`` and every HTTP body and header are searched: no canary
anywhere.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import openai
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import String, Text, select

from app.core.errors import BudgetExceededError
from app.models import Base
from app.observability import setup_telemetry
from app.simulator.config import ScriptRule
from app.simulator.server import SimulatorServer
from app.tracking.llm_client import AsyncLLMClient, LLMClient

StartService = Any  # tests/api/conftest.py: start_service(**settings) -> Service

PROVIDER_KEY = "provcanary" + secrets.token_hex(12)
PROMPT = "promptcanary" + secrets.token_hex(12)
MESSAGES = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": f"Fix the bug. {PROMPT}"},
]


class EchoingProvider(BaseHTTPRequestHandler):
    """A provider that rejects every call quoting the key and the request back (as some do)."""

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        request_body = self.rfile.read(length).decode()
        message = (
            f"Incorrect API key provided: {self.headers.get('authorization')}. "
            f"Request was: {request_body}"
        )
        payload = json.dumps({"error": {"message": message, "type": "invalid_request_error"}})
        self.send_response(401)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def echoing_provider() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoingProvider)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def text_columns() -> list[Any]:
    return [
        column
        for table in Base.metadata.sorted_tables
        for column in table.columns
        if isinstance(column.type, String | Text)
    ]


def assert_no_canary(where: str, text: str, canaries: dict[str, str]) -> None:
    for name, canary in canaries.items():
        assert canary not in text, f"{name} leaked into {where}"


async def test_no_canary_reaches_logs_spans_rows_metrics_or_bodies(
    start_service: StartService,
    runtime_factory: Any,
    sim: SimulatorServer,
    echoing_provider: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    service = await start_service(openai_api_key=PROVIDER_KEY, openai_max_retries=1)
    runtime = service.runtime
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry(
        runtime.settings.model_copy(update={"enable_opentelemetry": True}),
        app=service.app,
        engine=runtime.engine,
        span_exporter=exporter,
    )
    assert telemetry.tracer_provider is not None
    tracer = telemetry.tracer_provider.get_tracer("canary")
    _, admin_key = service.issue("root", "admin")
    _, alice_key = service.issue("alice")
    canaries = {
        "provider key": PROVIDER_KEY,
        "prompt": PROMPT,
        "admin key": admin_key,
        "alice's key": alice_key,
        "alice's key secret": alice_key.split("_", 2)[2][:20],
    }
    sim.state.add_scripts(
        [ScriptRule.model_validate({"reply": {"content": "ok", "usage": {"prompt_tokens": 9}}})]
    )

    def client(**overrides: Any) -> LLMClient:
        return LLMClient(
            task_id="t-canary", user_id="alice", agent="FixAgent", runtime=runtime, tracer=tracer,
            **overrides,
        )  # fmt: skip

    # Successful calls: plain, streamed, async.
    client().chat_completion(messages=MESSAGES, model="gpt-4o-mini")
    for _ in client().chat_completion(messages=MESSAGES, model="gpt-4o-mini", stream=True):
        pass
    await AsyncLLMClient(
        task_id="t-canary", user_id="alice", runtime=runtime, tracer=tracer
    ).chat_completion(messages=MESSAGES, model="gpt-4o-mini")
    # Provider errors: 500 (retried, then raised), 400, a request the provider quotes back.
    sim.state.schedule_fault("500", times=2)
    with pytest.raises(openai.InternalServerError):
        client().chat_completion(messages=MESSAGES, model="gpt-4o-mini")
    sim.state.schedule_fault("400")
    with pytest.raises(openai.BadRequestError):
        client().chat_completion(messages=MESSAGES, model="gpt-4o-mini")
    # A provider that echoes the key and the whole request in its error.
    echo_runtime = runtime_factory(openai_api_key=PROVIDER_KEY, openai_base_url=echoing_provider)
    with pytest.raises(openai.AuthenticationError):
        LLMClient(
            task_id="t-canary", user_id="alice", runtime=echo_runtime, tracer=tracer
        ).chat_completion(messages=MESSAGES, model="gpt-4o-mini")
    # Budget refusals.
    budget_runtime = runtime_factory(
        openai_api_key=PROVIDER_KEY, budget_task_max_usd=Decimal("0.000000000001")
    )
    with pytest.raises(BudgetExceededError):
        LLMClient(
            task_id="t-canary", user_id="alice", runtime=budget_runtime, tracer=tracer
        ).chat_completion(messages=MESSAGES, model="gpt-4o-mini")
    # Careless debug logging of our own.
    careless = logging.getLogger("app.services.careless")
    careless.debug("calling with api_key=%s and key %s", PROVIDER_KEY, alice_key)
    careless.debug("headers: %s", {"Authorization": f"Bearer {admin_key}"})
    try:
        raise RuntimeError(f"provider said no to {PROVIDER_KEY}")
    except RuntimeError:
        careless.exception("call failed")

    # HTTP: authenticated calls, errors and the service endpoints.
    bodies: list[httpx.Response] = []
    alice, admin = service.client(alice_key), service.client(admin_key)
    bodies += [
        await alice.get("/api/v1/usage/user/alice"),
        await alice.get("/api/v1/usage/task/t-canary"),
        await alice.get("/api/v1/usage/export?task_id=t-canary&format=json"),
        await alice.get("/api/v1/usage/export?task_id=t-canary&format=csv"),
        await admin.get("/api/v1/usage/overall"),
        await admin.get("/api/v1/admin/keys"),
        await alice.get("/api/v1/admin/keys"),
        await service.client(alice_key + "x").get("/api/v1/task"),
        await service.client(f"{PROVIDER_KEY}").get("/api/v1/task"),
        await alice.post("/api/v1/task/submit", json={alice_key: 1, "model": PROVIDER_KEY}),
        await alice.get(f"/api/v1/usage/user/{PROVIDER_KEY}"),
        await service.client().get("/health"),
        await service.client().get("/metrics"),
    ]
    telemetry.shutdown()

    for response in bodies:
        headers = " ".join(f"{k}: {v}" for k, v in response.headers.items())
        assert_no_canary(f"{response.request.url}", response.text + headers, canaries)
    assert_no_canary("the log", caplog.text, canaries)
    for record in caplog.records:
        assert_no_canary("a log record", record.getMessage() + str(record.exc_text), canaries)
    spans = exporter.get_finished_spans()
    assert len(spans) >= 8
    for span in spans:
        assert_no_canary(f"span {span.name}", span.to_json(), canaries)
    with runtime.engine.connect() as conn:
        rows = 0
        for column in text_columns():
            for (value,) in conn.execute(select(column).where(column.is_not(None))):
                rows += 1
                assert_no_canary(f"{column.table.name}.{column.name}", str(value), canaries)
    assert rows > 0
    errors = {r.error_type for r in _usage_rows(runtime)}
    assert {"InternalServerError", "BadRequestError", "AuthenticationError"} <= errors
    assert "BudgetExceededError" in errors


def _usage_rows(runtime: Any) -> list[Any]:
    from app.models import LLMUsage

    with runtime.session_factory() as session:
        return list(session.scalars(select(LLMUsage)))
