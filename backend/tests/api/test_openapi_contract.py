"""Schemathesis against the service's own OpenAPI schema, in process (ASGI), on SQLite and
PostgreSQL: anonymous, with a user's key and with an admin's key, every operation answers
without a 5xx, with a status code, content type and body its schema documents.

Bounded for CI (``CONTRACT_MAX_EXAMPLES`` cases per operation, default 15, about a minute for
all six runs); set ``ASA_CONTRACT_MAX_EXAMPLES=200`` for a deeper local run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.access import api_keys
from app.core.db import transaction
from app.core.runtime import Runtime
from app.main import create_app

CONTRACT_MAX_EXAMPLES = int(os.environ.get("ASA_CONTRACT_MAX_EXAMPLES", "15"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@dataclass
class Contract:
    schema: Any
    headers: dict[str, str]


@pytest.fixture(params=["anonymous", "user", "admin"])
def contract(
    request: pytest.FixtureRequest, runtime_factory: Callable[..., Runtime], tmp_path: Path
) -> Iterator[Contract]:
    runtime = runtime_factory(
        run_task_worker=False,  # submitted tasks stay queued: nothing is cloned or run
        task_submit_rate_per_minute=0,
        examples_dir=tmp_path / "examples",
        workspace_root=tmp_path / "ws",
    )
    with transaction(runtime.session_factory) as session:  # keys exist before the service starts
        admin = api_keys.create_key(session, user_id="root", role="admin").key
        user = api_keys.create_key(session, user_id="alice").key
    key = {"anonymous": None, "user": user, "admin": admin}[request.param]
    app = create_app(runtime.settings)
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        yield Contract(schema=schema, headers={"Authorization": f"Bearer {key}"} if key else {})
    finally:
        shutdown_lifespans()


def test_every_operation_keeps_its_contract(contract: Contract) -> None:
    # Operations are driven one by one from their Hypothesis strategies (schemathesis' lazy
    # pytest integration does not run on pytest 9); every failure is collected, then reported.
    failures: list[str] = []
    operations = [result.ok() for result in contract.schema.get_all_operations()]
    assert len(operations) >= 20
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=CONTRACT_MAX_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
        )
        def keeps_contract(case: Any) -> None:
            response = case.call(headers=dict(contract.headers))  # call() adds to the dict
            case.validate_response(response, checks=CHECKS)

        try:
            keeps_contract()
        except Exception as exc:
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
