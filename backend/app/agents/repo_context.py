"""What FixAgent shows the model: a compact repository map and the files that matter.

Files are chosen from the failure's tracebacks (``File "x.py", line 3`` and ``x.py:3``) and from
paths or file names mentioned in the bug description, source files before tests, each capped.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

MAX_MAP_FILES = 300
MAX_FILES = 6
MAX_FILE_CHARS = 16_000
_TRACE_PATH = re.compile(r'File "([^"]+)", line \d+|([\w./-]+\.\w+):\d+')
_MENTION = re.compile(r"[\w./-]+\.(?:py|js|ts|go|rs|java|rb|c|h|cpp|toml|cfg|ini|json|yaml|yml)\b")
_SKIP_DIRS = {".git", "__pycache__", "node_modules", ".venv", "venv", ".tox", "dist", "build"}


def is_test_path(path: str) -> bool:
    parts = Path(path).parts
    name = parts[-1] if parts else path
    return (
        any(p in ("test", "tests", "testing") for p in parts[:-1])
        or name.startswith("test_")
        or name.endswith(("_test.py", ".test.js", ".test.ts", "_test.go"))
        or name == "conftest.py"
    )


def list_files(repo: Path) -> list[str]:
    found: list[str] = []
    for path in sorted(repo.rglob("*")):
        rel = path.relative_to(repo)
        if any(part in _SKIP_DIRS for part in rel.parts) or not path.is_file() or path.is_symlink():
            continue
        found.append(rel.as_posix())
        if len(found) >= 5000:
            break
    return found


def repo_map(repo: Path, files: list[str]) -> str:
    """One line per file; Python files with their top-level classes and functions."""
    lines: list[str] = []
    for rel in files[:MAX_MAP_FILES]:
        entry = rel
        if rel.endswith(".py"):
            names = _python_outline(repo / rel)
            if names:
                entry += ": " + ", ".join(names)
        lines.append(entry)
    if len(files) > MAX_MAP_FILES:
        lines.append(f"... and {len(files) - MAX_MAP_FILES} more files")
    return "\n".join(lines)


def _python_outline(path: Path) -> list[str]:
    try:
        if path.stat().st_size > 200_000:
            return []
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError, OSError):
        return []
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.append(f"def {node.name}")
        elif isinstance(node, ast.ClassDef):
            names.append(f"class {node.name}")
    return names[:20]


def relevant_files(
    repo: Path, files: list[str], failure_output: str, bug_description: str
) -> list[str]:
    """Up to MAX_FILES repository files the failure or the bug names, sources first."""
    known = set(files)
    by_name: dict[str, list[str]] = {}
    for rel in files:
        by_name.setdefault(Path(rel).name, []).append(rel)
    picked: list[str] = []

    def consider(candidate: str) -> None:
        candidate = candidate.strip()
        rel = _to_relative(repo, candidate)
        matches = [rel] if rel in known else by_name.get(Path(candidate).name, [])
        for match in matches[:2]:
            if match not in picked:
                picked.append(match)

    for match in _TRACE_PATH.finditer(failure_output):
        consider(match.group(1) or match.group(2))
    for match in _MENTION.finditer(bug_description):
        consider(match.group(0))
    picked.sort(key=is_test_path)  # stable: sources first, in order of mention
    return picked[:MAX_FILES]


def _to_relative(repo: Path, candidate: str) -> str:
    path = Path(candidate)
    if path.is_absolute():
        try:
            return path.resolve().relative_to(repo.resolve()).as_posix()
        except (ValueError, OSError):
            return ""
    return path.as_posix().removeprefix("./")


def render_files(repo: Path, paths: list[str]) -> str:
    blocks: list[str] = []
    for rel in paths:
        try:
            text = (repo / rel).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if len(text) > MAX_FILE_CHARS:
            text = text[:MAX_FILE_CHARS] + "\n... [truncated]"
        blocks.append(f"### {rel}\n```\n{text}\n```")
    return "\n\n".join(blocks)
