"""Hostile input over HTTP: oversized bodies, submission floods, echoed secrets, /metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

StartService = Any  # tests/api/conftest.py: start_service(**settings) -> Service

SUBMISSION = {
    "repo_url": "https://example.org/acme/widgets.git",
    "bug_description": "the widget count is off by one",
    "test_command": "pytest -q",
}


async def test_a_declared_body_over_the_limit_gets_413(start_service: StartService) -> None:
    service = await start_service(max_request_body_bytes=4096)
    _, key = service.issue("alice")
    body = {**SUBMISSION, "bug_description": "x" * 5000}

    response = await service.client(key).post("/api/v1/task/submit", json=body)

    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"


async def test_a_chunked_body_over_the_limit_gets_413(start_service: StartService) -> None:
    service = await start_service(max_request_body_bytes=4096)
    _, key = service.issue("alice")

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"repo_url": "https://example.org/a.git", "bug_description": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'", "test_command": "pytest"}'

    response = await service.client(key).post(
        "/api/v1/task/submit", content=chunks(), headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"


async def test_a_body_within_the_limit_is_served(start_service: StartService) -> None:
    service = await start_service(max_request_body_bytes=4096)
    _, key = service.issue("alice")
    body = {**SUBMISSION, "bug_description": "x" * 3000}

    response = await service.client(key).post("/api/v1/task/submit", json=body)

    assert response.status_code == 202, response.text


async def test_task_submissions_are_rate_limited_per_key(start_service: StartService) -> None:
    service = await start_service(task_submit_rate_per_minute=1, task_submit_burst=2)
    _, alice_key = service.issue("alice")
    _, bob_key = service.issue("bob")
    alice, bob = service.client(alice_key), service.client(bob_key)

    statuses = [(await alice.post("/api/v1/task/submit", json=SUBMISSION)) for _ in range(3)]

    assert [r.status_code for r in statuses] == [202, 202, 429]
    limited = statuses[-1]
    assert limited.json()["error"] == "rate_limited"
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert (await bob.post("/api/v1/task/submit", json=SUBMISSION)).status_code == 202
    assert (await alice.get("/api/v1/task")).status_code == 200  # reads are not limited


async def test_validation_errors_never_echo_a_submitted_key(start_service: StartService) -> None:
    service = await start_service()
    _, key = service.issue("alice")
    _, other_key = service.issue("bob")
    client = service.client(key)
    provider_key = "sk-proj-" + "Z" * 40

    for body in [
        {**SUBMISSION, other_key: "x"},  # as a field name
        {**SUBMISSION, "max_attempts": other_key},  # as a value
        {**SUBMISSION, "model": f"gpt-4o {provider_key}"},
        {**SUBMISSION, "max_cost_usd": provider_key},
    ]:
        response = await client.post("/api/v1/task/submit", json=body)
        assert response.status_code == 422, response.text
        assert response.json()["error"] == "invalid_input"
        for secret in (key, other_key, provider_key):
            assert secret not in response.text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("repo_url", "ext::sh -c touch% /tmp/pwned"),
        ("repo_url", "relative/path"),
        ("bug_description", "   "),
        ("bug_description", "x" * 20_001),
        ("test_command", ""),
        ("max_attempts", 0),
        ("max_cost_usd", -1),
        ("model", "gpt 4o"),
        ("ref", "--upload-pack=evil"),
    ],
)
async def test_every_submitted_field_is_validated_with_a_clear_422(
    start_service: StartService, field: str, value: Any
) -> None:
    service = await start_service()
    response = await service.client().post("/api/v1/task/submit", json={**SUBMISSION, field: value})

    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "invalid_input"
    if isinstance(body["detail"], list):
        assert any(field in issue["loc"] for issue in body["detail"])
    else:
        assert body["field"] == field


async def test_metrics_is_open_without_a_token(start_service: StartService) -> None:
    service = await start_service()
    service.issue("root", "admin")

    assert (await service.client().get("/metrics")).status_code == 200


async def test_metrics_requires_the_metrics_token_when_set(start_service: StartService) -> None:
    token = "metrics-token-0123456789"
    service = await start_service(metrics_token=token)
    _, admin_key = service.issue("root", "admin")

    for client in [
        service.client(),
        service.client("metrics-token-wrong-0000"),
        service.client(admin_key),  # API keys are not metrics tokens
    ]:
        response = await client.get("/metrics")
        assert response.status_code == 401
        assert token not in response.text
    allowed = await service.client(token).get("/metrics")
    assert allowed.status_code == 200 and "llm_requests_total" in allowed.text


def test_a_weak_metrics_token_is_refused() -> None:
    from pydantic import ValidationError

    from app.core.config import Settings

    with pytest.raises(ValidationError, match="METRICS_TOKEN"):
        Settings(metrics_token="short")
    assert Settings(metrics_token="").metrics_token is None


async def test_out_of_range_paging_gets_422_not_500(start_service: StartService) -> None:
    service = await start_service()
    client = service.client()
    huge = 2**80  # found by the contract test: once a 500 from the database driver

    for path in [f"/api/v1/limits/overrides?offset={huge}", f"/api/v1/task?offset={huge}"]:
        response = await client.get(path)
        assert response.status_code == 422, (path, response.text)
