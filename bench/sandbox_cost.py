"""What the sandbox costs: the time to run `python3 -c pass` bare, under the runner before the
sandbox work (the legacy confinement: unshare + prlimit), and under bubblewrap without and with
a cgroup, and with the scratch copy of a small repository a test run gets. One run, the modes
interleaved round by round so drift on a shared machine hits them all alike. On a loaded
machine the median mostly measures the queue for a core; the minimum, the run that did not
wait, is the better estimate of what a mode itself costs. (The CPU time of the processes is no
help: bubblewrap's PID 1 is reaped by init, not by us, so ``getrusage`` misses the command.)

The "before" runner is the file as it was at commit ``faf4f74`` (read with ``git show``), run
unchanged; every sandboxed mode gets the task defaults' CPU and memory limits (prlimit).

    cd backend && .venv/bin/python ../bench/sandbox_cost.py [--rounds 60] [--python PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from app.sandbox.runner import detect_isolation, run_sandboxed

BEFORE_COMMIT = "faf4f74"
LIMITS: dict[str, Any] = {"cpu_seconds": 600, "memory_mb": 4096}


def old_runner(repo_root: Path) -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{BEFORE_COMMIT}:backend/app/sandbox/runner.py"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    spec = importlib.util.spec_from_loader("old_runner", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_runner"] = module  # dataclasses look their module up while being made
    exec(compile(source, f"{BEFORE_COMMIT}:runner.py", "exec"), module.__dict__)
    return module


def small_repo(root: Path, files: int = 100, size: int = 10_000) -> Path:
    repo = root / "repo"
    (repo / "pkg").mkdir(parents=True)
    for i in range(files):
        (repo / "pkg" / f"mod_{i}.py").write_bytes(os.urandom(size // 2).hex().encode())
    return repo


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument(
        "--python",
        default=shutil.which("python3", path="/usr/bin:/bin") or os.path.realpath(sys.executable),
        help="the interpreter every mode starts (default: the system's python3)",
    )
    args = parser.parse_args()
    backend = Path(__file__).resolve().parents[1] / "backend"
    old = old_runner(backend.parent)
    isolation = detect_isolation()
    if isolation.bwrap is None:
        sys.exit(f"bubblewrap is needed for this benchmark: {isolation.bwrap_missing}")
    no_cgroup = dataclasses.replace(isolation, cgroups=None)
    argv = [args.python, "-c", "pass"]

    with tempfile.TemporaryDirectory(prefix="asa-bench-") as scratch:
        cwd = Path(scratch)
        repo = small_repo(cwd)
        modes: dict[str, Callable[[], object]] = {
            "bare": lambda: subprocess.run(argv, cwd=cwd, check=True),
            "before: old runner": lambda: old.run_sandboxed(argv, cwd, timeout_s=60, **LIMITS),
            "bwrap": lambda: run_sandboxed(argv, cwd, timeout_s=60, isolation=no_cgroup, **LIMITS),
            "bwrap + cgroup": lambda: run_sandboxed(argv, cwd, timeout_s=60, **LIMITS),
            "bwrap + cgroup + scratch copy (100 files, 1 MB)": lambda: run_sandboxed(
                argv, repo, timeout_s=60, scratch_copy=True, **LIMITS
            ),
        }
        for run in modes.values():  # warm-up: page cache, probes
            run()
        times: dict[str, list[float]] = {name: [] for name in modes}
        for _ in range(args.rounds):
            for name, run in modes.items():
                started = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - started) * 1000)

    bare = statistics.median(times["bare"])
    before = statistics.median(times["before: old runner"])
    bare_min, before_min = min(times["bare"]), min(times["before: old runner"])
    report = {
        "machine": {
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "interpreter started": args.python,
            "kernel": platform.release(),
            "cgroups": f"v{isolation.cgroups.version}" if isolation.cgroups else "none",
            "load average (1 min) at the end": round(os.getloadavg()[0], 2),
        },
        "rounds": args.rounds,
        "ms": {
            name: {
                "p50": round(statistics.median(values), 1),
                "p90": round(pct(values, 0.9), 1),
                "added to bare (p50)": round(statistics.median(values) - bare, 1),
                "added to before (p50)": round(statistics.median(values) - before, 1),
                "min": round(min(values), 1),
                "added to bare (min)": round(min(values) - bare_min, 1),
                "added to before (min)": round(min(values) - before_min, 1),
            }
            for name, values in times.items()
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
