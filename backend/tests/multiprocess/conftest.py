"""Fixtures of the multiprocess suite: a scratch PostgreSQL database and the processes of one
test (``tests/support/cluster.py``), every one killed at the end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from app.core.db import create_db_engine
from app.core.migrations import upgrade_to_head
from tests.support.cluster import Cluster


@pytest.fixture
def pg_database(scratch_postgres_database: Any) -> Iterator[str]:
    """A new, migrated PostgreSQL database for this test's processes, dropped afterwards."""
    with scratch_postgres_database("procs_mp") as url:
        upgrade_to_head(url)
        yield url


@pytest.fixture
def pg_engine(pg_database: str) -> Iterator[Engine]:
    engine = create_db_engine(pg_database)
    yield engine
    engine.dispose()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Processes on a database the test chooses (``cluster.database_url``)."""
    processes = Cluster("", tmp_path)
    try:
        yield processes
    finally:
        processes.kill_all()


@pytest.fixture
def pg_cluster(cluster: Cluster, pg_database: str) -> Cluster:
    """Processes on the scratch PostgreSQL database."""
    cluster.database_url = pg_database
    return cluster
