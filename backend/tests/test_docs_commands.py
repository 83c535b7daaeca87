"""Every shell command in the docs that can run here (no Docker engine, no API key) is run.

``bash`` blocks are executed; blocks that need Docker, bind every interface or start a second
long-running server are skipped, each with its reason below. Commands run against a live
``make run`` on a free loopback port (``localhost:8000`` in the docs is rewritten to it), with a
throwaway database; blocks that write files run in a scratch copy of the repository's top.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"```bash\n(.*?)```", re.DOTALL)
SKIPPED = {
    "docker-compose": "needs a Docker engine, which this machine does not run",
    "HOST=0.0.0.0": "binds every interface; `make run` itself is exercised by the live server",
    "--reload": "a development server; the same app is served by the live `make run`",
    "prometheus --config.file": "a second long-running server; tests/observability runs Prometheus",
    "localhost:9090/-/reload": "needs that Prometheus server running",
}
WRITES_FILES = ("cp ", "> ")


def bash_blocks(doc: str) -> list[str]:
    return [block.strip() for block in BLOCK.findall((ROOT / doc).read_text())]


def skip_reason(block: str) -> str | None:
    if block == "make run":
        return "this is the live server the other commands talk to"
    return next((why for marker, why in SKIPPED.items() if marker in block), None)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@contextlib.contextmanager
def serve(data: Path, database_url: str | None = None) -> Iterator[tuple[int, dict[str, str]]]:
    """`make run` on a free port, as the README says, with its own database."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ASA_"))}
    env.update(
        DATABASE_URL=database_url or f"sqlite:///{data / 'docs.db'}",
        SPOOL_DIR=str(data / "spool"),
        SIMULATOR_LATENCY_MS="1",
    )
    server = subprocess.Popen(
        ["make", "run", f"PORT={port}"],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            raise AssertionError("make run did not serve /health within 120 s")
        yield port, env
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, dict[str, str]]]:
    with serve(tmp_path_factory.mktemp("docs-live")) as served:
        yield served


def run(script: str, port: int, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    script = script.replace("localhost:8000", f"localhost:{port}").replace(
        "127.0.0.1:8000", f"127.0.0.1:{port}"
    )
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def scratch_copy(tmp_path: Path) -> Path:
    for name in (".env.example", "prometheus.yml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "observability", tmp_path / "observability")
    (tmp_path / "backend").mkdir()
    return tmp_path


def test_the_readme_walkthrough_fixes_the_example_bug(live: tuple[int, dict[str, str]]) -> None:
    port, env = live
    blocks = [b for b in bash_blocks("README.md") if skip_reason(b) is None]
    assert len(blocks) >= 4

    result = run("\n".join(blocks), port, env, ROOT)

    assert result.returncode == 0, result.stderr + result.stdout
    assert '"status":"succeeded"' in result.stdout
    assert "+    return sum(values) / len(values)" in result.stdout.replace("\\n", "\n")
    assert "llm_requests_total" in result.stdout


# The quick start has its own test below: its steps depend on each other.
@pytest.mark.parametrize("doc", ["OBSERVABILITY.md", "docs/GATEWAY.md"])
def test_every_runnable_command_of_the_doc_succeeds(
    doc: str, live: tuple[int, dict[str, str]], tmp_path: Path
) -> None:
    port, env = live
    ran = 0
    for block in bash_blocks(doc):
        if skip_reason(block) is not None:
            continue
        if (
            block.startswith("promtool")
            and shutil.which("promtool") is None
            and os.environ.get("ASA_REQUIRE_POSTGRES") != "1"
        ):
            continue
        cwd = ROOT
        if any(w in block for w in WRITES_FILES):
            (tmp_path / f"b{ran}").mkdir()
            cwd = scratch_copy(tmp_path / f"b{ran}")
        result = run(block, port, env, cwd)
        assert result.returncode == 0, f"{doc}: {block}\n{result.stderr}{result.stdout}"
        ran += 1
    assert ran >= 1


# How the quick start's steps are taken here, in the order the file gives them.
QUICKSTART_SKIPPED = {
    "docker-compose": "needs a Docker engine, which this machine does not run",
    "--reload": "a development server; the same app is served by the live `make run`",
    "apt-get install": "installs a system package; .ci/run installs Prometheus beforehand",
}


@pytest.fixture(params=["sqlite", "postgresql"])
def quickstart_live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[int, dict[str, str]]]:
    """A fresh `make run` (step 4) on a new SQLite or PostgreSQL database."""
    data = tmp_path_factory.mktemp("quickstart")
    if request.param == "sqlite":
        with serve(data) as served:
            yield served
        return
    scratch_database = request.getfixturevalue("scratch_postgres_database")
    with scratch_database("asa_quickstart") as url, serve(data, url) as served:
        yield served


def test_the_quickstart_runs_in_order_without_docker(
    quickstart_live: tuple[int, dict[str, str]], tmp_path: Path
) -> None:
    """Every command of QUICKSTART_OBSERVABILITY.md that needs no Docker, in the order written,
    in one shell (a user's terminal) on a fresh database: the seed's curl commands answer in
    open local mode, the example task's calls are in the usage API and the metrics, and Debian's
    Prometheus started as "Without Docker" says scrapes the backend with the file's own
    configuration. ``{task_id}`` is what the reader replaces: the id step 5 gave."""
    port, env = quickstart_live
    steps: list[str] = []
    prometheus: list[str] = []
    for block in bash_blocks("QUICKSTART_OBSERVABILITY.md"):
        if block == "make run" or any(marker in block for marker in QUICKSTART_SKIPPED):
            continue
        (prometheus if block.startswith("prometheus ") else steps).append(block)
    assert len(steps) >= 6 and len(prometheus) == 1
    script = "\n".join(steps).replace("{task_id}", "$TASK_ID")

    result = run(script, port, env, shadow_checkout(tmp_path / "checkout"))

    output = result.stdout
    assert result.returncode == 0, result.stderr + output
    assert '"task_id"' in output  # the seed's request was accepted
    assert '"status":"succeeded"' in output.replace(" ", "")  # the example task's end event
    assert '"requests":' in output and '"error"' not in output
    assert "llm_requests_total{" in output
    _scrape_with_the_quickstart_prometheus(prometheus[0], port, tmp_path / "prometheus")


def shadow_checkout(top: Path) -> Path:
    """The repository's top as a reader's clone: links to every file, except that what the
    quick start writes (``backend/.env``) lands here, not in the real checkout."""
    (top / "backend").mkdir(parents=True)
    for entry in ROOT.iterdir():
        if entry.name not in ("backend", ".git"):
            (top / entry.name).symlink_to(entry)
    for entry in (ROOT / "backend").iterdir():
        if entry.name != ".env":
            (top / "backend" / entry.name).symlink_to(entry)
    return top


def _scrape_with_the_quickstart_prometheus(block: str, backend_port: int, scratch: Path) -> None:
    """Run the block's Prometheus (on free ports, in a scratch copy of the repository's top
    whose configuration names the live backend) until it has scraped the backend."""
    if shutil.which("prometheus") is None:
        if os.environ.get("ASA_REQUIRE_POSTGRES") == "1":
            pytest.fail("prometheus is required in CI (.ci/run installs it)")
        pytest.skip("prometheus not installed")
    scratch.mkdir()
    top = scratch_copy(scratch)
    web_port = _free_port()
    for config in (top / "observability" / "prometheus").glob("prometheus*.yml"):
        text = config.read_text().replace("127.0.0.1:8000", f"127.0.0.1:{backend_port}")
        config.write_text(text.replace("127.0.0.1:9090", f"127.0.0.1:{web_port}"))
    command = (
        block.replace("\\\n", " ")
        .replace("127.0.0.1:9090", f"127.0.0.1:{web_port}")
        .replace("/tmp/asa-prometheus", str(scratch / "tsdb"))
    )
    server = subprocess.Popen(
        ["bash", "-c", f"exec {command}"],
        cwd=top,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        health = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server.poll() is None:
            try:
                targets = httpx.get(f"http://127.0.0.1:{web_port}/api/v1/targets", timeout=2)
                active = targets.json()["data"]["activeTargets"]
                health = next(
                    (t["health"] for t in active if t["labels"]["job"] == "asa-backend"), None
                )
                if health == "up":
                    break
            except (httpx.HTTPError, ValueError):  # not serving yet (or not its API yet)
                pass
            time.sleep(0.5)
        assert server.poll() is None, server.stderr.read() if server.stderr else ""
        assert health == "up", f"asa-backend target: {health}"
        rules = httpx.get(f"http://127.0.0.1:{web_port}/api/v1/rules", timeout=5).json()
        assert rules["data"]["groups"], "the alert rules next to the configuration are loaded"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
