"""The official openai SDK, unchanged, pointed at the gateway of a live service."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import openai
from pydantic import BaseModel

from tests.gateway.conftest import LiveService, unique

PROMPT = [{"role": "user", "content": "Say hello to the gateway."}]


def test_sync_chat_is_one_priced_row_with_its_cost_in_headers(service: LiveService) -> None:
    key_id, key = service.new_key(unique("u"))
    client = openai.OpenAI(base_url=service.base_url, api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=PROMPT)
    completion = raw.parse()
    assert completion.choices[0].message.content
    request_id = raw.headers["x-asa-request-id"]
    row = service.row(request_id)
    assert row.status == "success"
    assert row.user_id == service_user(service, key_id)
    assert row.prompt_tokens == completion.usage.prompt_tokens  # type: ignore[union-attr]
    assert row.completion_tokens == completion.usage.completion_tokens  # type: ignore[union-attr]
    assert row.cost_pico_usd > 0
    assert Decimal(raw.headers["x-asa-cost-usd"]) == row.cost_usd
    assert row.attempts == 1
    assert "upstream:default" in (row.flags or "")


def service_user(service: LiveService, key_id: str) -> str:
    from app.access import api_keys
    from app.core.db import create_session_factory, transaction
    from app.models import ApiKey

    del api_keys
    with transaction(create_session_factory(service.engine)) as session:
        row = session.get(ApiKey, key_id)
        assert row is not None
        return row.user_id


def test_streamed_chat_hides_the_usage_chunk_it_asked_for(service: LiveService) -> None:
    user = unique("u")
    _, key = service.new_key(user)
    client = openai.OpenAI(base_url=service.base_url, api_key=key, max_retries=0)
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=PROMPT, stream=True
    ) as raw:
        request_id = raw.headers["x-asa-request-id"]
        chunks = list(raw.parse())
    assert chunks, "no chunks"
    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    row = service.row(request_id)
    assert row.status == "success"
    assert row.is_stream and not row.is_partial
    assert row.completion_tokens > 0 and row.cost_pico_usd > 0
    assert "usage_missing" not in (row.flags or "")  # exact usage, not an estimate
    assert text


def test_streamed_chat_gives_the_usage_chunk_with_the_cost_when_asked(
    service: LiveService,
) -> None:
    _, key = service.new_key(unique("u"))
    client = openai.OpenAI(base_url=service.base_url, api_key=key, max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=PROMPT,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    last = chunks[-1]
    assert last.usage is not None and not last.choices
    extra = last.model_extra or {}
    row = service.row(extra["asa"]["request_id"])
    assert Decimal(extra["asa"]["cost_usd"]) == row.cost_usd
    assert row.prompt_tokens == last.usage.prompt_tokens


def test_async_chat_and_structured_output_through_parse(service: LiveService) -> None:
    class Verdict(BaseModel):
        verdict: str
        confidence: float

    user = unique("u")
    _, key = service.new_key(user)

    async def run() -> tuple[object, object]:
        client = openai.AsyncOpenAI(base_url=service.base_url, api_key=key, max_retries=0)
        plain = await client.chat.completions.create(model="gpt-4o", messages=PROMPT)
        parsed = await client.chat.completions.parse(
            model="gpt-4o-mini", messages=PROMPT, response_format=Verdict
        )
        await client.close()
        return plain, parsed

    plain, parsed = asyncio.run(run())
    assert plain.choices[0].message.content  # type: ignore[attr-defined]
    assert isinstance(parsed.choices[0].message.parsed, Verdict)  # type: ignore[attr-defined]
    rows = service.rows(user_id=user)
    assert [r.model for r in rows] == ["gpt-4o", "gpt-4o-mini"]
    assert all(r.status == "success" and r.cost_pico_usd > 0 for r in rows)


def test_responses_api_plain_and_streamed(service: LiveService) -> None:
    user = unique("u")
    _, key = service.new_key(user)
    client = openai.OpenAI(base_url=service.base_url, api_key=key, max_retries=0)
    response = client.responses.create(model="gpt-4o-mini", input="Write one line.")
    assert response.output_text
    events = list(
        client.responses.create(model="gpt-4o-mini", input="Write one line.", stream=True)
    )
    assert events[-1].type == "response.completed"
    rows = service.rows(user_id=user)
    assert [(r.operation, r.is_stream, r.status) for r in rows] == [
        ("responses", False, "success"),
        ("responses", True, "success"),
    ]
    assert rows[0].prompt_tokens == response.usage.input_tokens  # type: ignore[union-attr]
    assert all(r.cost_pico_usd > 0 for r in rows)


def test_embeddings_are_one_row_each(service: LiveService) -> None:
    user = unique("u")
    _, key = service.new_key(user)
    client = openai.OpenAI(base_url=service.base_url, api_key=key, max_retries=0)
    result = client.embeddings.create(model="text-embedding-3-small", input=["a", "b c"])
    assert len(result.data) == 2
    (row,) = service.rows(user_id=user)
    assert row.operation == "embeddings"
    assert row.prompt_tokens == result.usage.prompt_tokens


def test_models_lists_what_the_upstream_serves(service: LiveService) -> None:
    _, key = service.new_key(unique("u"))
    client = openai.OpenAI(base_url=service.base_url, api_key=key, max_retries=0)
    ids = [m.id for m in client.models.list()]
    assert "gpt-4o-mini" in ids
