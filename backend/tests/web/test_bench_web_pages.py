"""The web console benchmark's commands (docs/BENCHMARKS.md) run as written, on a small ledger:
``bench/seed_usage.py`` then ``bench/web_pages.py``, real subprocesses on a scratch SQLite file.
Nothing is timed; every page the benchmark requests must answer 200."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BACKEND = Path(__file__).resolve().parents[2]
BENCH = BACKEND.parent / "bench"


def run(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, *args], cwd=BACKEND, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_web_console_benchmark_runs_as_documented(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bench-usage.db'}"
    run(
        str(BENCH / "seed_usage.py"), "--db", url, "--rows", "3000", "--days", "30", "--users", "20"
    )

    saved = tmp_path / "web.json"
    run(str(BENCH / "web_pages.py"), "--db", url, "--tasks", "300", "--requests", "1",
        "--out", str(saved))  # fmt: skip

    result = json.loads(saved.read_text())
    assert result["llm_usage_rows"] == 3000 and result["tasks_rows"] == 300
    assert "overview /, ended days not kept" in result["pages"]
    assert all(page["n"] == 1 for page in result["pages"].values())
