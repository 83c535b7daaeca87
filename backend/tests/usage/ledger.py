"""A synthetic ledger for the usage tests and an exact comparison of reports."""

from __future__ import annotations

import dataclasses
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine

from app.access.principal import Principal
from app.models import LATENCY_BUCKETS_MS
from app.tracking.record import UsageRecord
from app.tracking.writer import insert_usage

ADMIN = Principal("root", "admin")
NOW = datetime(2026, 5, 20, 6, 0, tzinfo=UTC)


def write_ledger(engine: Engine, records: list[UsageRecord]) -> list[UsageRecord]:
    """Write ``records`` as the usage writer does (row and rollups), in one transaction."""
    with engine.begin() as conn:
        for record in records:
            insert_usage(conn, record)
    return records


def random_ledger(count: int, seed: int = 7) -> list[UsageRecord]:
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        status = rng.choice(["success"] * 8 + ["error", "blocked"])
        prompt = 0 if status == "blocked" else rng.randint(0, 5000)
        records.append(
            UsageRecord(
                request_id=uuid.uuid4().hex,
                model=rng.choice(["gpt-4o", "gpt-4o-mini", "o3-mini"]),
                status=status,
                task_id=rng.choice(["t1", "t2", "t3", None]),
                user_id=rng.choice(["alice", "bob", None]),
                agent=rng.choice(["fix_agent", "code_agent", None]),
                provider=rng.choice(["openai", "openai", "anthropic", "mistral"]),
                operation=rng.choice(["chat", "chat", "responses", "embeddings"]),
                prompt_tokens=prompt,
                completion_tokens=rng.randint(0, 800),
                cached_tokens=rng.randint(0, prompt),
                reasoning_tokens=rng.randint(0, 100),
                cost_pico_usd=rng.randint(0, 10**10),
                cost_status=rng.choice(["priced"] * 9 + ["unpriced"]),
                # include exact bucket bounds: a bound belongs to the bucket it closes
                latency_ms=rng.choice([*LATENCY_BUCKETS_MS, rng.uniform(0, 150_000)]),
                timestamp=NOW - timedelta(seconds=rng.randint(0, 40 * 86400)),
            )
        )
    # Waste the recommendations read (truncated answers, the SDK's retries), drawn from their
    # own generator so the fields above stay what they were.
    waste = random.Random(seed + 1)
    return [
        dataclasses.replace(
            record,
            finish_reason=waste.choice(["stop", "stop", "length", None]),
            attempts=waste.choice([1, 1, 1, 2, 3]),
        )
        if record.status != "blocked"
        else record
        for record in records
    ]


def assert_same_report(actual: Any, expected: Any, path: str = "") -> None:
    """Equal, except floats (latency sums add up in a different order) to 1e-9 relative."""
    if isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-9), path
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), path
        for key in expected:
            assert_same_report(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), path
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same_report(a, e, f"{path}[{index}]")
    else:
        assert actual == expected, path
