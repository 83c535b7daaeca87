"""A key's budget under a race: 4 client processes call 2 service worker processes (uvicorn
--workers 2) on one PostgreSQL, all with one key whose cap is far below what the calls would
spend. The spend ends at or under the cap, the key's counter equals the ledger, no reservation
is left open, and every refused call was refused before the upstream (the simulator counts).

The default size is 4 x 25 calls; ``ASA_GATEWAY_RACE_CALLS=250`` (marked ``slow``: the full
1,000) runs the issue's size.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select, text

from app.access import api_keys
from app.budgets import limits as budget_limits
from app.core.db import create_db_engine, create_session_factory, transaction
from app.models import BudgetReservation, LLMUsage
from app.simulator.server import SimulatorServer
from tests.conftest import make_settings

BACKEND = Path(__file__).resolve().parents[2]
CLIENTS = 4
CAP = Decimal("0.0004")

CLIENT = r"""
import json, sys
from concurrent.futures import ThreadPoolExecutor
import openai
base_url, key, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)
def one(i):
    try:
        client.chat.completions.create(
            model="gpt-4o-mini", max_tokens=20,
            messages=[{"role": "user", "content": f"race call {i}"}])
        return "ok"
    except openai.APIStatusError as exc:
        return str(exc.status_code)
with ThreadPoolExecutor(4) as pool:
    outcomes = list(pool.map(one, range(calls)))
print(json.dumps({o: outcomes.count(o) for o in set(outcomes)}))
"""


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def race_database(scratch_postgres_database: object) -> Iterator[str]:
    with scratch_postgres_database("gw_race") as url:  # type: ignore[operator]
        yield url


def _serve(url: str, sim: SimulatorServer, tmp_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _port()
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "OPENAI_BASE_URL": sim.base_url,
        "OPENAI_API_KEY": "sk-race-upstream-key-000",
        "OPENAI_MAX_RETRIES": "0",
        "RUN_TASK_WORKER": "false",
        "NOTIFICATIONS_DISPATCHER": "false",
        "SPOOL_DIR": str(tmp_path / "spool"),
    }
    log = (tmp_path / "service.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--workers", "2",
         "--host", "127.0.0.1", "--port", str(port), "--no-access-log"],
        cwd=BACKEND, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return process, base
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.5)
    process.terminate()
    raise RuntimeError((tmp_path / "service.log").read_text()[-3000:])


def _race(race_database: str, sim: SimulatorServer, tmp_path: Path, calls: int) -> None:
    settings = make_settings(race_database, sim.base_url, tmp_path, auto_migrate=True)
    from app.core.migrations import upgrade_to_head

    upgrade_to_head(race_database)
    engine = create_db_engine(race_database)
    with transaction(create_session_factory(engine)) as session:
        issued = api_keys.create_key(session, user_id="racer")
        budget_limits.set_key_budget(session, settings, issued.row.id, CAP, updated_by="test")
    key_id, key = issued.row.id, issued.key
    process, base = _serve(race_database, sim, tmp_path)
    try:
        # 1 warm-up call per worker is not needed: the cap is per key, shared by both.
        before = sim.state.stats()["requests"]
        clients = [
            subprocess.Popen(
                [sys.executable, "-c", CLIENT, f"{base}/v1", key, str(calls)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(CLIENTS)
        ]
        outcomes: dict[str, int] = {}
        for client in clients:
            out, err = client.communicate(timeout=600)
            assert client.returncode == 0, err
            for name, count in json.loads(out).items():
                outcomes[name] = outcomes.get(name, 0) + count
        sent = sim.state.stats()["requests"] - before
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert sum(outcomes.values()) == CLIENTS * calls
    assert set(outcomes) <= {"ok", "402"}, outcomes
    assert outcomes.get("ok", 0) > 0 and outcomes.get("402", 0) > 0, outcomes
    with engine.connect() as conn:
        spent = conn.scalar(
            select(func.coalesce(func.sum(LLMUsage.cost_pico_usd), 0)).where(
                LLMUsage.user_id == "racer"
            )
        )
        statuses = dict(
            conn.execute(
                select(LLMUsage.status, func.count())
                .where(LLMUsage.user_id == "racer")
                .group_by(LLMUsage.status)
            ).all()
        )
        counter = conn.execute(
            text(
                "SELECT spent_pico_usd, reserved_pico_usd FROM budget_counter "
                "WHERE scope = 'key' AND subject_id = :k"
            ),
            {"k": key_id},
        ).one()
        open_reservations = conn.scalar(select(func.count()).select_from(BudgetReservation))
    engine.dispose()
    assert statuses == {"success": outcomes["ok"], "blocked": outcomes["402"]}
    assert sent == outcomes["ok"]  # a refused call never reached the upstream
    assert 0 < spent <= CAP * 10**12
    assert (counter.spent_pico_usd, counter.reserved_pico_usd) == (spent, 0)
    assert open_reservations == 0


def test_a_keys_cap_holds_under_four_racing_processes(
    race_database: str, sim: SimulatorServer, tmp_path: Path
) -> None:
    _race(race_database, sim, tmp_path, calls=25)


@pytest.mark.slow
def test_a_keys_cap_holds_for_a_thousand_racing_calls(
    race_database: str, sim: SimulatorServer, tmp_path: Path
) -> None:
    _race(race_database, sim, tmp_path, calls=int(os.environ.get("ASA_GATEWAY_RACE_CALLS", 250)))
