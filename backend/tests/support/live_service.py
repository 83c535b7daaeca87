"""The service as ``make run`` serves it, in its own process on a loopback port, for tests that
need a real server between them and the app (a browser, requests racing a commit)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from app.access import api_keys
from app.core.db import create_db_engine, create_session_factory, transaction
from app.core.migrations import upgrade_to_head
from tests.conftest import ScratchDatabase

BACKEND = Path(__file__).resolve().parents[2]


@dataclass
class Live:
    base: str
    admin_key: str
    user_key: str
    user_key_id: str

    def api(self, key: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.base, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def live_service(database_url: str, data: Path) -> Iterator[Live]:
    """The service as ``make run`` serves it (uvicorn, simulator, task worker), with an admin
    key for alice and a user key for bob issued before it starts (so keys are required)."""
    upgrade_to_head(database_url)
    engine = create_db_engine(database_url)
    with transaction(create_session_factory(engine)) as session:
        admin = api_keys.create_key(session, user_id="alice", role="admin")
        user = api_keys.create_key(session, user_id="bob", role="user")
        keys = (admin.key, user.key, user.row.id)
    engine.dispose()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ASA_"))}
    env.update(
        DATABASE_URL=database_url,
        SPOOL_DIR=str(data / "spool"),
        EXAMPLES_DIR=str(data / "examples"),
        WORKSPACE_ROOT=str(data / "workspaces"),
        WEB_SESSION_SECRET_FILE=str(data / "web_session_secret"),
        SIMULATOR_LATENCY_MS="1",
        BIND_HOST="127.0.0.1",
    )
    log = (data / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=BACKEND, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise AssertionError((data / "server.log").read_text()[-3000:])
            time.sleep(0.2)
        yield Live(base, *keys)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


@contextmanager
def live_service_on(backend: str, data: Path, scratch: ScratchDatabase) -> Iterator[Live]:
    """``live_service`` on a new SQLite file (``backend`` "sqlite") or a scratch PostgreSQL
    database ("postgresql")."""
    if backend == "sqlite":
        with live_service(f"sqlite:///{data / 'asa.db'}", data) as service:
            yield service
    else:
        with scratch("asa_live") as url, live_service(url, data) as service:
            yield service
