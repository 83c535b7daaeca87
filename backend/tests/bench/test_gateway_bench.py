"""``bench/gateway.py`` at a tiny size: it starts nginx, LiteLLM's proxy (when its venv is
installed) and ASA's service, drives them with wrk, and every call it counts is a 200 that ASA
recorded as a row. The figures themselves are in docs/BENCHMARKS.md; nothing here is timed.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import ScratchDatabase

BENCH = Path(__file__).resolve().parents[3] / "bench"
BACKEND = BENCH.parent / "backend"
LITELLM = Path("/opt/litellm-venv/bin/litellm")

needs_wrk_and_nginx = pytest.mark.skipif(
    shutil.which("wrk") is None or shutil.which("nginx", path="/usr/sbin:/usr/bin") is None,
    reason="needs wrk and nginx (apt-get install -y wrk nginx-light)",
)


def _harness() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # gateway.py imports its sibling gateway_procs.py
    try:
        spec = importlib.util.spec_from_file_location("asa_bench_gateway", BENCH / "gateway.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def _script(python: str, script: str, *args: str) -> str:
    """Run ``bench/<script>`` from the backend directory, as the docs do; its stdout."""
    done = subprocess.run(
        [python, str(BENCH / script), *args],
        cwd=BACKEND,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _run(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "results.json"
    tiny = ["--rounds", "1", "--seconds", "1", "--steps", "1,2", "--out", str(out)]
    _script(sys.executable, "gateway.py", *tiny, *args)
    results: dict[str, Any] = json.loads(out.read_text())
    return results


def test_percentiles_of_several_runs_weigh_each_run_by_its_calls() -> None:
    gateway = _harness()
    fast = {"requests": 3000, "grid": [1.0] * len(gateway.GRID)}
    slow = {"requests": 1000, "grid": [9.0] * len(gateway.GRID)}
    assert gateway.percentile([fast, slow], 50) == 1.0
    assert gateway.percentile([fast, slow], 74) == 1.0
    assert gateway.percentile([fast, slow], 76) == 9.0
    assert gateway.percentile([fast, slow], 99) == 9.0


@needs_wrk_and_nginx
@pytest.mark.slow
@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_a_tiny_run_measures_every_target_and_asa_records_every_call(
    backend: str, tmp_path: Path, scratch_postgres_database: ScratchDatabase
) -> None:
    targets = ["direct", "asa"] + (["litellm"] if LITELLM.exists() else [])
    args = ["--targets", ",".join(targets)]
    if backend == "postgresql":
        with scratch_postgres_database("gwbench_admin") as admin_url:
            results = _run(tmp_path, *args, "--postgres", admin_url)
            engine = create_engine(admin_url)
            with engine.connect() as conn:
                left = conn.execute(
                    text("SELECT datname FROM pg_database WHERE datname = :name"),
                    {"name": results["database_name"]},
                ).all()
            engine.dispose()
        assert left == []  # the scratch database the run made is dropped
        assert results["database"] == "postgresql"
    else:
        results = _run(tmp_path, *args)
        assert results["database"] == "sqlite"

    for phase in ("sequential", "concurrent"):
        for name in targets:
            figures = results[phase][name]
            assert figures["requests"] > 0, (phase, name)
            assert figures["errors"] == 0, (phase, name)  # non-2xx answers count as errors
            if name != "direct":
                assert (
                    figures["added_p50_ms"]
                    == figures["p50_ms"] - results[phase]["direct"]["p50_ms"]
                )
    proxies = [name for name in targets if name != "direct"]
    assert sorted(results["capacity"]["steps"]) == sorted(proxies)
    # Every call wrk saw answered is a row (a call cut off when a run ends may add one more).
    assert results["rows"] >= results["asa_calls"] > 0
    assert results["machine"]["nproc"] >= 1


@needs_wrk_and_nginx
@pytest.mark.parametrize(
    ("python", "client"),
    [
        (sys.executable, "httpx2"),
        pytest.param(
            str(LITELLM.parent / "python"),
            "aiohttp",
            marks=pytest.mark.skipif(not LITELLM.exists(), reason="LiteLLM's venv is not here"),
        ),
    ],
)
def test_the_client_measurement_posts_through_each_client(python: str, client: str) -> None:
    lines = _script(python, "gateway_client.py", "--client", client, "--calls", "100").splitlines()
    assert [line.split(":")[0] for line in lines] == [f"{client} c{n}" for n in (1, 8, 50)]
    assert all("calls/s" in line and "ms/call" in line for line in lines)
