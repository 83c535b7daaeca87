"""Small real git repositories for tests, and the output of their failing test runs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

GIT = ("git", "-c", "user.name=t", "-c", "user.email=t@t")


def make_repo(root: Path, files: dict[str, str], *, name: str = "repo") -> Path:
    """``root/name``: a git repository (branch ``main``) with ``files`` in one commit.

    File names may contain directories; each text is dedented (``textwrap.dedent``), so a test
    can indent a file's text inside its own code.
    """
    repo = root / name
    repo.mkdir()
    for path, text in files.items():
        target = repo / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(text))
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "init"]):
        subprocess.run([*GIT, *args], cwd=repo, check=True, capture_output=True)
    return repo


def failing_pytest_output(repo: Path) -> str:
    """Run ``pytest -q`` in ``repo`` (on this interpreter), assert it fails, return its output."""
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stdout
    return result.stdout
