"""Keys, attribution, budgets and errors of the gateway, over HTTP on a live service."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import httpx
import openai
import pytest
from opentelemetry import trace as otel_trace
from prometheus_client import REGISTRY

from app.core.db import create_session_factory, transaction
from app.models import Task
from app.observability import MAX_AGENT_LABELS, agent_labels
from tests.gateway.conftest import LiveService, post, unique

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _make_task(service: LiveService, user_id: str) -> str:
    task_id = unique("t").replace("-", "")[:32]
    with transaction(create_session_factory(service.engine)) as session:
        session.add(
            Task(
                id=task_id,
                user_id=user_id,
                repo_url="https://example.com/r.git",
                bug_description="b",
                test_command="pytest",
                model="gpt-4o-mini",
            )
        )
    return task_id


def test_open_local_mode_takes_an_sdk_placeholder_key_as_the_local_user(
    start_service: object,
) -> None:
    # A fresh database has no keys only in the first test of a session; so this asserts the
    # rule on whatever mode the service is in: with keys configured, a placeholder is refused.
    service: LiveService = start_service()  # type: ignore[operator]
    answer = post(service, "/chat/completions", CHAT, headers=_auth("sk-placeholder"))
    if answer.status_code == 200:
        row = service.row(answer.headers["x-asa-request-id"])
        assert row.user_id == "local"
    else:
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "invalid_api_key"


def test_an_unknown_asa_key_is_a_401_in_the_openai_shape(service: LiveService) -> None:
    service.new_key(unique("u"))  # keys configured
    before = service.sim_requests()
    client = openai.OpenAI(base_url=service.base_url, api_key="asa_0123456789ab_" + "x" * 43)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert caught.value.code == "invalid_api_key"
    assert service.sim_requests() == before


def test_a_malformed_body_is_a_400_not_a_500(service: LiveService) -> None:
    _, key = service.new_key(unique("u"))
    for body in (b"{not json", b"[1, 2]", b'{"messages": []}', b'{"model": 5}'):
        answer = httpx.post(
            f"{service.base_url}/chat/completions",
            content=body,
            headers={**_auth(key), "content-type": "application/json"},
        )
        assert answer.status_code == 400, body
        assert answer.json()["error"]["type"] == "invalid_request_error"


def test_unknown_v1_paths_answer_in_the_openai_shape(service: LiveService) -> None:
    answer = httpx.get(f"{service.base_url}/files")
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "unknown_url"


def test_task_and_agent_headers_attribute_the_row(service: LiveService) -> None:
    user = unique("u")
    _, key = service.new_key(user)
    task_id = _make_task(service, user)
    answer = post(
        service,
        "/chat/completions",
        CHAT,
        headers={**_auth(key), "X-ASA-Task-Id": task_id, "X-ASA-Agent": "aider"},
    )
    assert answer.status_code == 200
    row = service.row(answer.headers["x-asa-request-id"])
    assert (row.user_id, row.task_id, row.agent) == (user, task_id, "aider")


def test_another_users_task_id_is_refused_and_nothing_is_sent(service: LiveService) -> None:
    owner, intruder = unique("owner"), unique("intruder")
    service.new_key(owner)
    _, key = service.new_key(intruder)
    task_id = _make_task(service, owner)
    before = service.sim_requests()
    for task in (task_id, "no-such-task"):
        answer = post(
            service, "/chat/completions", CHAT, headers={**_auth(key), "X-ASA-Task-Id": task}
        )
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == "task_not_found"
    assert service.sim_requests() == before
    assert service.rows(task_id=task_id) == []


def test_a_hostile_agent_header_is_a_400(service: LiveService) -> None:
    _, key = service.new_key(unique("u"))
    answer = post(
        service, "/chat/completions", CHAT, headers={**_auth(key), "X-ASA-Agent": "x" * 65}
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_agent"


def test_over_budget_is_a_402_budget_exceeded_with_no_upstream_request(
    service: LiveService,
) -> None:
    _, admin = service.new_key(unique("admin"), role="admin")
    user = unique("u")
    _, key = service.new_key(user)
    put = httpx.put(
        f"{service.url}/api/v1/limits/users/{user}/daily",
        json={"limit_usd": "0.0000001"},
        headers=_auth(admin),
    )
    assert put.status_code == 200, put.text
    before = service.sim_requests()
    client = openai.OpenAI(base_url=service.base_url, api_key=key, max_retries=2)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    error = caught.value
    assert error.status_code == 402
    body = error.body
    assert isinstance(body, dict)
    assert body["code"] == "budget_exceeded" and body["type"] == "budget_exceeded"
    assert body["scope"] == "user_daily"
    assert Decimal(body["limit_usd"]) == Decimal("0.0000001")
    assert "spent_usd" in body
    assert service.sim_requests() == before  # no upstream request, and the SDK did not retry
    (row,) = service.rows(user_id=user)
    assert row.status == "blocked"


def test_a_limited_call_says_what_is_left(service: LiveService) -> None:
    _, admin = service.new_key(unique("admin"), role="admin")
    user = unique("u")
    _, key = service.new_key(user)
    httpx.put(
        f"{service.url}/api/v1/limits/users/{user}/monthly",
        json={"limit_usd": "5"},
        headers=_auth(admin),
    ).raise_for_status()
    answer = post(service, "/chat/completions", CHAT, headers=_auth(key))
    assert answer.status_code == 200
    row = service.row(answer.headers["x-asa-request-id"])
    assert answer.headers["x-asa-budget-scope"] == "user_monthly"
    assert Decimal(answer.headers["x-asa-budget-remaining-usd"]) == Decimal(5) - row.cost_usd


def test_the_span_is_a_child_of_the_clients_traceparent(
    start_service: object,
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    service: LiveService = start_service()  # type: ignore[operator]
    service.gateway.tracer = provider.get_tracer("test")
    _, key = service.new_key(unique("u"))
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    answer = post(
        service,
        "/chat/completions",
        CHAT,
        headers={**_auth(key), "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
    )
    assert answer.status_code == 200
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "chat gpt-4o-mini"]
    assert format(span.context.trace_id, "032x") == trace_id
    # Its parent is the client's span, or the server span of the request (itself the client's
    # child) when the app is instrumented - as it is once another test of this process turned
    # OpenTelemetry on: either way one trace, continued here.
    assert span.parent is not None
    client_span = format(span.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert client_span or not span.parent.is_remote
    assert span.kind == otel_trace.SpanKind.CLIENT
    assert span.attributes is not None
    assert span.attributes["gen_ai.provider.name"] == "openai"
    assert span.attributes["llm.request_id"] == answer.headers["x-asa-request-id"]
    row = service.row(answer.headers["x-asa-request-id"])
    assert row.trace_id == trace_id


def test_the_row_keeps_every_agent_while_the_metrics_bound_them(
    start_service: Callable[..., LiveService],
) -> None:
    # A client may name as many agents as it likes: the ledger keeps each name, the metrics
    # show GATEWAY_MAX_AGENT_LABELS of them per process and the rest as "other".
    service = start_service(gateway_max_agent_labels=1)  # already reached in this process
    _, key = service.new_key(unique("u"))
    agent = unique("agent")

    def requests(label: str) -> float:
        sample = {"model": "gpt-4o-mini", "status": "success", "agent": label}
        return REGISTRY.get_sample_value("llm_requests_total", sample) or 0.0

    others = requests("other")
    try:
        answer = post(
            service, "/chat/completions", CHAT, headers={**_auth(key), "X-ASA-Agent": agent}
        )
        assert answer.status_code == 200
        assert service.row(answer.headers["x-asa-request-id"]).agent == agent
        assert requests(agent) == 0.0
        assert requests("other") == others + 1
    finally:
        agent_labels.limit = MAX_AGENT_LABELS  # the next services of this process
