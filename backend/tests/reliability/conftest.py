"""The reliability suite: the service killed, starved and flooded, and its books counted.

Each scenario (``test_rel_*.py``, one per file, its design in the module docstring) drives the
real service and ends by counting: calls seen by the simulator (``GET /sim/stats``: requests,
succeeded, response ids) and calls that returned to their callers (a call log written by the
serving process) against the rows in the database.

1. ``test_rel_sigterm``: SIGTERM mid-stream, restart: 0 lost, 0 duplicated.
2. ``test_rel_sigkill``: SIGKILL mid-stream (rows in the spool), restart: every returned call
   has its row.
3. ``test_rel_db_outage``: PostgreSQL unreachable / SQLite locked mid-stream: calls go on, rows
   land within seconds of recovery.
4. ``test_rel_telemetry``: OTLP collector down, /metrics scraped every 100 ms: calls and
   memory unaffected.
5. ``test_rel_provider_faults``: 429, 500, timeouts, truncated bodies and streams: attempts as
   documented, budgets released, tasks in a clear final state.
6. ``test_rel_budget_race``: concurrent calls from four processes against a cap on PostgreSQL.
7. ``test_rel_load``: usage reports and task submissions under load (``bench/load_api.py``).

How the calls are made: ``tests/support/service.py`` serves the real app with uvicorn and runs a
stream of tracked calls *inside* that process (see its docstring for why a stream rather than
tasks), so a
signal to the process hits the one that tracks the calls. The simulator is its own process
(``tests/support/simulator.py``), so its counters survive the service. Every process is a child of
the test on loopback; every wait is bounded.

Sizes: ``make test`` runs the CI size (about three minutes on two cores for the whole
directory). The full size, whose figures are in ``docs/BENCHMARKS.md``::

    cd backend && ASA_RELIABILITY_FULL=1 ASA_RELIABILITY_RESULTS=/tmp/reliability \
        .venv/bin/python -m pytest -q tests/reliability -s

(``ASA_RELIABILITY_RESULTS``, optional, is where each scenario writes its figures as JSON.)
PostgreSQL scenarios run when ``ASA_TEST_POSTGRES_URL`` (default ``127.0.0.1:5432/test``) is
reachable; each creates and drops its own database there and never stops the server.

The helpers are in ``tests/support`` (``reliability``, ``service``, ``simulator``, ``race``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.reliability import (
    DatabaseOutage,
    Ledger,
    PostgresOutage,
    ServiceProcess,
    SimulatorProcess,
    SqliteOutage,
    service_env,
)

RESULTS_DIR = os.environ.get("ASA_RELIABILITY_RESULTS")


@pytest.fixture(scope="session")
def rel_simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorProcess]:
    """One simulator process for the suite: 10 ms per answer, 1 s Retry-After on a 429."""
    sim = SimulatorProcess(
        tmp_path_factory.mktemp("simulator"),
        {"latency_ms": 10, "retry_after_seconds": 1, "timeout_fault_seconds": 30},
    )
    yield sim
    sim.stop()


@pytest.fixture
def sim(rel_simulator: SimulatorProcess) -> SimulatorProcess:
    """The suite's simulator process (here ``sim`` is a process, not the in-process server of
    ``tests/conftest.py``), with its counters, scripts and faults reset."""
    rel_simulator.reset()
    return rel_simulator


@pytest.fixture
def pg_url(scratch_postgres_database: Callable[[str], Any]) -> Iterator[str]:
    """A new, empty PostgreSQL database (the service migrates it when it starts)."""
    with scratch_postgres_database("asa_rel") as url:
        yield url


@pytest.fixture
def sqlite_file_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'asa.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest) -> str:
    """A new database of each backend."""
    fixture = "sqlite_file_url" if request.param == "sqlite" else "pg_url"
    url: str = request.getfixturevalue(fixture)
    return url


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    reader = Ledger(ledger_url)
    yield reader
    reader.close()


@pytest.fixture
def outage(ledger_url: str) -> Iterator[DatabaseOutage]:
    """Turns the database off and on: PostgreSQL behind a paused proxy, SQLite locked."""
    maker = SqliteOutage if ledger_url.startswith("sqlite") else PostgresOutage
    made = maker(ledger_url)
    yield made
    made.close()


ServiceFactory = Callable[..., ServiceProcess]


@pytest.fixture
def start_service(tmp_path: Path, sim: SimulatorProcess) -> Iterator[ServiceFactory]:
    """Start the service (``tests/support/service.py``) on a database; every start shares one call
    log.

    ``start_service(url, name="first", **settings)``: settings are environment variables of the
    service, given as lower-case Settings field names.
    """
    started: list[ServiceProcess] = []
    call_log = tmp_path / "calls.jsonl"

    def start(database_url: str, name: str = "service", **settings: Any) -> ServiceProcess:
        env = service_env(tmp_path, database_url, sim, **settings)
        service = ServiceProcess(tmp_path, env, call_log, name)
        started.append(service)
        return service

    yield start
    for service in started:
        service.kill()


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A scenario's figures: printed, and written to $ASA_RELIABILITY_RESULTS/<test>.json."""
    values: dict[str, Any] = {}
    yield values
    if not values:
        return
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    print(f"\n{name}: {json.dumps(values, sort_keys=True)}")
    if RESULTS_DIR:
        out = Path(RESULTS_DIR)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
