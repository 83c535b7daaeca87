"""Upstream faults, fallbacks, client disconnects and the provider-key canary, over HTTP."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.simulator.config import SimulatorConfig
from app.simulator.server import SimulatorServer
from tests.gateway.conftest import LiveService, post, unique

PRIMARY_KEY = "sk-canary-primary-7f3a9c2e5d1b"
BACKUP_KEY = "sk-canary-backup-4e8d2a6c0f9b"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi there"}]}


def _routes(primary: str, backup: str, **primary_extra: object) -> str:
    return json.dumps(
        {
            "upstreams": {
                "primary": {"base_url": primary, "api_key": PRIMARY_KEY, **primary_extra},
                "backup": {"base_url": backup, "api_key": BACKUP_KEY},
            },
            "models": {
                "gpt-4o-mini": ["primary", "backup"],
                "solo": [{"upstream": "primary", "model": "gpt-4o-mini"}],
            },
        }
    )


@pytest.fixture
def routed(start_service: Callable[..., LiveService], sim: SimulatorServer) -> LiveService:
    """A service whose gpt-4o-mini goes to the simulator twice over: as ``primary`` then, if
    that fails, as ``backup``; ``solo`` is gpt-4o-mini on ``primary`` only."""
    return start_service(gateway_routes=_routes(sim.base_url, sim.base_url, timeout_seconds=0.5))


def _key(service: LiveService) -> tuple[str, str]:
    user = unique("u")
    return user, service.new_key(user)[1]


def _headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("fault", ["429", "500", "truncate", "timeout"])
def test_a_failing_primary_falls_back_in_one_row(
    routed: LiveService, sim: SimulatorServer, fault: str
) -> None:
    _, key = _key(routed)
    sim.state.schedule_fault(fault)  # type: ignore[arg-type]
    before = routed.sim_requests()
    answer = post(routed, "/chat/completions", CHAT, headers=_headers(key))
    assert answer.status_code == 200, answer.text
    row = routed.row(answer.headers["x-asa-request-id"])
    assert row.status == "success"
    assert row.attempts == 2
    assert "upstream:backup" in (row.flags or "")
    assert row.cost_pico_usd > 0
    assert routed.sim_requests() == before + 2


def test_when_every_target_fails_the_client_gets_the_last_error_and_one_row(
    routed: LiveService, sim: SimulatorServer
) -> None:
    _, key = _key(routed)
    sim.state.schedule_fault("500", times=2)
    client = openai.OpenAI(base_url=routed.base_url, api_key=key, max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.with_raw_response.create(**CHAT)  # type: ignore[call-overload]
    request_id = caught.value.response.headers["x-asa-request-id"]
    row = routed.row(request_id)
    assert (row.status, row.attempts, row.error_type) == ("error", 2, "InternalServerError")


def test_a_429_without_fallback_is_passed_on_with_its_retry_hint(
    routed: LiveService, sim: SimulatorServer
) -> None:
    _, key = _key(routed)
    sim.state.schedule_fault("429")
    answer = post(routed, "/chat/completions", {**CHAT, "model": "solo"}, headers=_headers(key))
    assert answer.status_code == 429
    assert "retry-after" in answer.headers
    row = routed.row(answer.headers["x-asa-request-id"])
    assert (row.status, row.attempts, row.error_type) == ("error", 1, "RateLimitError")


def test_an_alias_is_priced_as_the_model_it_sends(routed: LiveService) -> None:
    _, key = _key(routed)
    answer = post(routed, "/chat/completions", {**CHAT, "model": "solo"}, headers=_headers(key))
    assert answer.status_code == 200
    row = routed.row(answer.headers["x-asa-request-id"])
    assert row.model == "gpt-4o-mini" and row.cost_pico_usd > 0


def test_a_stream_dropped_by_the_upstream_is_an_error_row(
    routed: LiveService, sim: SimulatorServer
) -> None:
    _, key = _key(routed)
    sim.state.schedule_fault("truncate")
    client = openai.OpenAI(base_url=routed.base_url, api_key=key, max_retries=0)
    with client.chat.completions.with_streaming_response.create(
        **{**CHAT, "model": "solo"},
        stream=True,  # type: ignore[arg-type]
    ) as raw:
        request_id = raw.headers["x-asa-request-id"]
        with pytest.raises(openai.APIConnectionError):
            list(raw.parse())
    row = _wait_row(routed, request_id)
    assert row.status == "error" and row.is_stream
    assert row.error_type == "APIConnectionError"


def _wait_row(service: LiveService, request_id: str, timeout: float = 10.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        rows = service.rows(request_id=request_id)
        if rows or time.monotonic() > deadline:
            assert len(rows) == 1
            return rows[0]
        time.sleep(0.05)


def test_a_client_that_goes_away_mid_stream_cancels_the_upstream_and_leaves_a_partial_row(
    start_service: Callable[..., LiveService],
) -> None:
    with SimulatorServer(SimulatorConfig(stream_chunk_delay_ms=150)) as slow:
        service = start_service(gateway_routes=_routes(slow.base_url, slow.base_url))
        _, key = _key(service)
        with httpx.stream(
            "POST",
            f"{service.base_url}/chat/completions",
            json={**CHAT, "stream": True},
            headers=_headers(key),
            timeout=30,
        ) as answer:
            request_id = answer.headers["x-asa-request-id"]
            lines = answer.iter_lines()
            seen = [next(lines) for _ in range(2)]
        assert any(line.startswith("data:") for line in seen)
        row = _wait_row(service, request_id)
        assert row.is_partial and row.status == "success"  # type: ignore[attr-defined]
        assert "stream_closed_early" in (row.flags or "")  # type: ignore[attr-defined]
        time.sleep(2.5)  # longer than the whole stream would have taken
        assert slow.state.stats()["succeeded"] == 0  # the upstream stream never finished


# -- the canary ------------------------------------------------------------------------------


def _echoing_upstream() -> Starlette:
    """An upstream that quotes the key it was sent in its 401, as real providers do."""

    async def chat(request: Request) -> JSONResponse:
        key = request.headers.get("authorization", "")
        return JSONResponse(
            {
                "error": {
                    "message": f"Incorrect API key provided: {key.removeprefix('Bearer ')}",
                    "type": "invalid_request_error",
                    "code": "invalid_api_key",
                }
            },
            status_code=401,
        )

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


@pytest.fixture
def echoing_upstream() -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_echoing_upstream(), log_config=None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(10)


def test_provider_keys_never_reach_a_response_row_span_or_log(
    start_service: Callable[..., LiveService],
    sim: SimulatorServer,
    echoing_upstream: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    service = start_service(gateway_routes=_routes(echoing_upstream, sim.base_url))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    service.gateway.tracer = provider.get_tracer("canary")
    user, key = _key(service)
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    # primary quotes its key in a 401 (not a fallback status: passed on); "solo" too; a stream;
    # a fallback after a 500; embeddings on the default upstream.
    sim.state.schedule_fault("500")
    for body in (
        CHAT,
        {**CHAT, "model": "solo"},
        {**CHAT, "model": "solo", "stream": True},
        {**CHAT, "model": "backup/gpt-4o-mini", "stream": True},
        {**CHAT, "model": "backup/gpt-4o-mini"},
    ):
        answer = post(service, "/chat/completions", body, headers=_headers(key))
        seen.append(answer.text + json.dumps(dict(answer.headers)))
    answer = post(
        service,
        "/embeddings",
        {"model": "text-embedding-3-small", "input": "x"},
        headers=_headers(key),
    )
    seen.append(answer.text + json.dumps(dict(answer.headers)))
    assert "Incorrect API key provided" in seen[0]  # the upstream's error did come back
    rows = service.rows(user_id=user)
    assert len(rows) == 6
    seen.extend(
        json.dumps({c.key: str(getattr(r, c.key)) for c in r.__table__.columns}) for r in rows
    )
    seen.extend(
        json.dumps({k: str(v) for k, v in (s.attributes or {}).items()}) + str(s.status)
        for s in exporter.get_finished_spans()
    )
    seen.extend(record.getMessage() for record in caplog.records)
    for secret in (PRIMARY_KEY, BACKUP_KEY, "sk-test-canary-key-0000"):
        leaks = [text for text in seen if secret in text]
        assert not leaks, f"{secret} leaked: {leaks[:1]}"
