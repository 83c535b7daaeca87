"""Which files of a workspace the agents look at, and which of them are tests.

Listing is bounded (``MAX_LISTED_FILES``) and prunes what is not the project's own code: version
control, caches, dependency folders and virtual environments (any folder holding a
``pyvenv.cfg``). Symlinks are never followed.
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_LISTED_FILES = 5000
SKIP_DIRS = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        "__pycache__",
        "node_modules",
        ".venv",
        "venv",
        ".tox",
        ".nox",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".eggs",
        "site-packages",
        "dist",
        "build",
    }
)


def is_test_path(path: str) -> bool:
    parts = Path(path).parts
    name = parts[-1] if parts else path
    return (
        any(p in ("test", "tests", "testing") for p in parts[:-1])
        or name.startswith("test_")
        or name.endswith(("_test.py", ".test.js", ".test.ts", "_test.go"))
        or name == "conftest.py"
    )


def list_files(repo: Path, limit: int = MAX_LISTED_FILES) -> list[str]:
    """Up to ``limit`` regular files under ``repo`` as sorted POSIX paths relative to it."""
    found: list[str] = []
    for folder, dirs, files in os.walk(repo):
        dirs[:] = sorted(
            d
            for d in dirs
            if d not in SKIP_DIRS
            and not d.endswith(".egg-info")
            and not os.path.islink(os.path.join(folder, d))
            and not os.path.exists(os.path.join(folder, d, "pyvenv.cfg"))
        )
        rel_folder = Path(folder).relative_to(repo)
        for name in sorted(files):
            path = os.path.join(folder, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            found.append((rel_folder / name).as_posix())
            if len(found) >= limit:
                return sorted(found)
    return sorted(found)
