"""Shared fixtures: databases built by the real migrations, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from app.core.config import Settings
from app.core.db import create_db_engine
from app.core.migrations import upgrade_to_head
from app.core.runtime import Runtime
from app.models import Base
from app.simulator.config import SimulatorConfig
from app.simulator.server import SimulatorServer

POSTGRES_URL = os.environ.get(
    "ASA_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REQUIRE_POSTGRES = os.environ.get("ASA_REQUIRE_POSTGRES") == "1"


def _postgres_available() -> bool:
    try:
        probe = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
        with probe.connect():
            pass
        probe.dispose()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("db") / "asa-test.db"
    url = f"sqlite:///{path}"
    upgrade_to_head(url)
    return url


ScratchDatabase = Callable[[str], AbstractContextManager[str]]


@contextmanager
def _scratch_postgres_database(prefix: str) -> Iterator[str]:
    if not _postgres_available():
        if REQUIRE_POSTGRES:
            pytest.fail(f"PostgreSQL required but unreachable at {POSTGRES_URL}")
        pytest.skip("PostgreSQL not reachable")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def scratch_postgres_database() -> ScratchDatabase:
    """``with scratch_postgres_database(prefix) as url``: a new, empty PostgreSQL database,
    dropped afterwards (skipped when PostgreSQL is unreachable, failed if it is required)."""
    return _scratch_postgres_database


@pytest.fixture(scope="session")
def postgresql_url(scratch_postgres_database: ScratchDatabase) -> Iterator[str]:
    with scratch_postgres_database("asa_test") as url:
        upgrade_to_head(url)
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """A migrated, emptied database of each backend."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    engine = create_db_engine(url)
    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())
    engine.dispose()
    return url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = create_db_engine(database_url)
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def simulator() -> Iterator[SimulatorServer]:
    """One simulator for the session; tests add their own scripts and reset it."""
    with SimulatorServer(SimulatorConfig()) as sim:
        yield sim


@pytest.fixture
def sim(simulator: SimulatorServer) -> SimulatorServer:
    """The session simulator with its scripts, faults and counters reset."""
    simulator.state.reset()
    return simulator


def make_settings(db_url: str, sim_base_url: str, tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": db_url,
        "openai_base_url": sim_base_url,
        "openai_api_key": "sk-test-canary-key-0000",
        "spool_dir": tmp_path / "spool",
        "auto_migrate": False,
        "openai_max_retries": 0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


RuntimeFactory = Callable[..., Runtime]


@pytest.fixture
def runtime_factory(
    database_url: str, sim: SimulatorServer, tmp_path: Path
) -> Iterator[RuntimeFactory]:
    """Build runtimes on the test database calling the simulator, with setting overrides."""
    built: list[Runtime] = []

    def build(**overrides: object) -> Runtime:
        settings = make_settings(database_url, sim.base_url, tmp_path, **overrides)
        rt = Runtime.build(settings, start_background=False)
        built.append(rt)
        return rt

    yield build
    for rt in built:
        rt.close()


@pytest.fixture
def runtime(runtime_factory: RuntimeFactory) -> Runtime:
    """A service runtime on the test database, calling the simulator."""
    return runtime_factory()


@pytest.fixture
def span_exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer(span_exporter: InMemorySpanExporter) -> Tracer:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    return provider.get_tracer("test")


# Markers by where a test lives (declared in pyproject.toml): ``pytest -m "not slow"`` is the
# quick loop; ``make test`` runs everything.
_DIRECTORY_MARKERS = {
    "reliability": ("reliability", "slow"),
    "observability": ("observability", "slow"),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = item.path.parts
        for directory, markers in _DIRECTORY_MARKERS.items():
            if directory in parts:
                for marker in markers:
                    item.add_marker(marker)
        callspec = getattr(item, "callspec", None)
        uses_postgres = "postgresql_url" in getattr(item, "fixturenames", ()) or (
            callspec is not None and callspec.params.get("database_url") == "postgresql"
        )
        if uses_postgres:
            item.add_marker("postgres")
