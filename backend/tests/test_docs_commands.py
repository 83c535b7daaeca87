"""Every shell command in the docs that can run here (no Docker engine, no API key) is run.

``bash`` blocks are executed; blocks that need Docker, bind every interface or start a second
long-running server are skipped, each with its reason below. Commands run against a live
``make run`` on a free loopback port (``localhost:8000`` in the docs is rewritten to it), with a
throwaway database; blocks that write files run in a scratch copy of the repository's top.
"""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, dict[str, str]]]:
    """`make run` on a free port, as the README says, with its own database."""
    data = tmp_path_factory.mktemp("docs-live")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ASA_"))}
    env.update(
        DATABASE_URL=f"sqlite:///{data / 'docs.db'}",
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


@pytest.mark.parametrize("doc", ["QUICKSTART_OBSERVABILITY.md", "OBSERVABILITY.md"])
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
