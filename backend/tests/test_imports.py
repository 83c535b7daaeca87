"""Every module of ``app`` imports on its own, in a fresh interpreter: no import cycle, and no
import-time side effects (no thread started, no file written, no connection made)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BACKEND_DIR = Path(__file__).resolve().parents[1]

# Imports each module with every ``app`` module forgotten first (third-party modules stay
# loaded, which keeps this to seconds); prints the modules that failed or had side effects.
# ``app.observability`` stays loaded: its Prometheus metrics are the process's one registry
# (defined once, as STYLE.md says), which a second import would register twice.
_PROBE = r"""
import importlib, os, pkgutil, sys, threading
import app

names = sorted(m.name for m in pkgutil.walk_packages(app.__path__, "app."))
before_threads = threading.active_count()
before_files = sorted(os.listdir("."))
problems = []
for name in names:
    kept = ("app", "app.observability")
    for loaded in [m for m in sys.modules if m.startswith("app.") and m not in kept]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        problems.append(f"{name}: {type(exc).__name__}: {exc}")
        continue
    if threading.active_count() != before_threads:
        problems.append(f"{name}: started a thread")
    if sorted(os.listdir(".")) != before_files:
        problems.append(f"{name}: wrote a file")
print(len(names))
print("\n".join(problems))
"""


def test_every_module_imports_alone_without_side_effects(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(BACKEND_DIR), "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    count, _, problems = done.stdout.partition("\n")
    assert int(count) > 80  # every module was tried, not an empty walk
    assert problems.strip() == ""
    assert list(tmp_path.iterdir()) == []
