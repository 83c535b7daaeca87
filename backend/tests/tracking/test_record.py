"""A usage record's id and the float cost its metrics and spans carry."""

from __future__ import annotations

import random
import uuid

from app.core.money import pico_to_usd
from app.models import new_id
from app.tracking.record import UsageRecord


def test_ids_are_random_version_4_uuids_in_hex() -> None:
    ids = [new_id() for _ in range(20_000)]

    assert len(set(ids)) == len(ids)
    for made in ids:
        parsed = uuid.UUID(made)
        assert parsed.hex == made  # 32 lowercase hex digits, as uuid4().hex
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
    # Every other bit varies: no digit but the version's is fixed.
    assert {made[12] for made in ids} == {"4"}
    assert {made[16] for made in ids} == set("89ab")
    for position in (0, 11, 13, 17, 31):
        assert len({made[position] for made in ids}) == 16


def test_the_float_cost_is_the_float_nearest_the_exact_cost() -> None:
    rng = random.Random(7)
    costs = [0, 1, 10**12, 10**12 - 1, 3 * 10**20 + 1, 2**63 + 12345]
    costs += [rng.randint(0, 10**6) for _ in range(2000)]
    costs += [rng.randint(0, 10**22) for _ in range(2000)]

    for pico in costs:
        record = UsageRecord(request_id="r", model="m", status="success", cost_pico_usd=pico)
        assert record.cost_usd_float == float(pico_to_usd(pico)), pico
