"""The example repositories that ship with ASA, turned into git repositories on first start.

A git repository cannot be committed inside ours, so ``examples/<name>`` holds the files and
``materialize_examples`` makes ``<examples_dir>/<name>`` a one-commit repository from them.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

from app.core.config import BACKEND_DIR

logger = logging.getLogger(__name__)
EXAMPLES_SOURCE = BACKEND_DIR.parent / "examples"
_GIT = (
    "git",
    "-c",
    "user.name=ASA",
    "-c",
    "user.email=asa@localhost",
    "-c",
    "commit.gpgsign=false",
)


def materialize_examples(target_root: Path, source_root: Path = EXAMPLES_SOURCE) -> list[Path]:
    """Create each missing example repository; returns the repositories' paths."""
    made: list[Path] = []
    if not source_root.is_dir():
        return made
    for source in sorted(p for p in source_root.iterdir() if p.is_dir()):
        repo = target_root / source.name
        if not (repo / ".git").is_dir():
            try:
                _create(source, repo)
            except (OSError, subprocess.SubprocessError) as exc:
                logger.warning("Could not prepare the example repository %s: %s", repo, exc)
                continue
        made.append(repo)
    return made


def _create(source: Path, repo: Path) -> None:
    staging = repo.with_name(repo.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for args in (
        ("init", "--quiet", "-b", "main"),
        ("add", "-A"),
        ("commit", "--quiet", "-m", "Example repository"),
    ):
        subprocess.run([*_GIT, *args], cwd=staging, check=True, capture_output=True, timeout=30)  # noqa: S603
    shutil.rmtree(repo, ignore_errors=True)
    staging.rename(repo)
