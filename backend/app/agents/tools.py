"""The tools FixAgent may call to look further than its first prompt: ``search_code``,
``read_file`` and ``list_dir``, confined to the repository.

Paths are untrusted model output: absolute paths, ``..``, ``.git`` and anything that resolves
(through symlinks) outside the repository are refused, and every answer is capped in size.
``search_text`` uses ``git grep`` (tracked files; hardened against the workspace's own git
configuration) when git is installed, else walks the listed files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from app.agents.repo_context import SKIP_DIRS, list_files

MAX_READ_LINES = 300
MAX_READ_CHARS = 24_000
MAX_SEARCH_RESULTS = 40
MAX_LIST_ENTRIES = 200
MAX_LINE_CHARS = 240
MAX_SEARCHED_FILE_BYTES = 1_000_000
GREP_TIMEOUT_S = 10.0

TOOL_SPECS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "search_code",
            "description": "Search the repository's files for a literal string; returns "
            "path:line: text for each match (at most 40).",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "The literal text to find."},
                    "path": {
                        "type": "string",
                        "description": "Optional folder or file to search in (relative).",
                    },
                },
                "required": ["query"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read lines start..end (1-based, inclusive) of a repository file, "
            "with line numbers; at most 300 lines a call.",
            "parameters": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "Path relative to the root."},
                    "start": {"type": "integer", "minimum": 1},
                    "end": {"type": "integer", "minimum": 1},
                },
                "required": ["path"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "list_dir",
            "description": "List a repository folder: sub-folders end with '/'.",
            "parameters": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "Relative folder; '.' is the root."}
                },
                "required": [],
                "additionalProperties": False,
            },
        },
    },
]


class ToolError(Exception):
    """A tool call the repository cannot answer; its message goes back to the model."""


def confine(
    repo: Path, raw: object, *, kind: Literal["file", "dir", "any"] = "file"
) -> tuple[str, Path]:
    """``(relative path, resolved path)`` of an existing file or folder inside ``repo`` for a
    model-given path, or :class:`ToolError`."""
    if not isinstance(raw, str) or "\x00" in raw or "\\" in raw:
        raise ToolError("paths are strings relative to the repository root, with '/'.")
    text = raw.strip() or "."
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        raise ToolError(f"{text} is absolute; use a path relative to the repository root.")
    parts = [p for p in PurePosixPath(text).parts if p != "."]
    if ".." in parts:
        raise ToolError(f"{text} contains '..'; paths must stay inside the repository.")
    if any(p.lower() == ".git" for p in parts):
        raise ToolError(f"{text} is inside .git.")
    root = repo.resolve(strict=True)
    try:
        resolved = root.joinpath(*parts).resolve()
    except (OSError, RuntimeError) as exc:
        raise ToolError(f"{text} cannot be resolved.") from exc
    if not resolved.is_relative_to(root) or any(
        p.lower() == ".git" for p in resolved.relative_to(root).parts
    ):
        raise ToolError(f"{text} resolves outside the repository.")
    if kind == "dir" and not resolved.is_dir():
        raise ToolError(f"{text} is not a folder.")
    if kind == "file" and not resolved.is_file():
        raise ToolError(f"{text} is not a file.")
    if kind == "any" and not resolved.exists():
        raise ToolError(f"{text} does not exist.")
    return "/".join(parts) or ".", resolved


class RepoTools:
    """Runs FixAgent's tool calls against one repository; answers are text, never exceptions."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo

    def run(self, name: str, arguments: str) -> str:
        """The answer to one tool call (an error message when it cannot be answered)."""
        try:
            args = json.loads(arguments or "{}")
        except ValueError:
            return "Error: the arguments are not valid JSON."
        if not isinstance(args, dict):
            return "Error: the arguments must be a JSON object."
        try:
            if name == "search_code":
                return self.search_code(args.get("query"), args.get("path"))
            if name == "read_file":
                return self.read_file(args.get("path"), args.get("start"), args.get("end"))
            if name == "list_dir":
                return self.list_dir(args.get("path", "."))
        except ToolError as exc:
            return f"Error: {exc}"
        return f"Error: there is no tool named {name!r}; use search_code, read_file or list_dir."

    def search_code(self, query: object, path: object = None) -> str:
        if not isinstance(query, str) or not query.strip():
            raise ToolError("search_code needs a non-empty query string.")
        scope = None
        if path not in (None, "", "."):
            scope, _ = confine(self.repo, path, kind="any")
        hits = search_text(self.repo, query, limit=MAX_SEARCH_RESULTS + 1, scope=scope)
        if not hits:
            return f"No matches for {query!r}."
        lines = [f"{p}:{n}: {t.strip()[:MAX_LINE_CHARS]}" for p, n, t in hits[:MAX_SEARCH_RESULTS]]
        if len(hits) > MAX_SEARCH_RESULTS:
            lines.append("... more matches; narrow the search with `path`.")
        return "\n".join(lines)

    def read_file(self, path: object, start: object = None, end: object = None) -> str:
        rel, resolved = confine(self.repo, path)
        first = start if isinstance(start, int) and start > 0 else 1
        last = end if isinstance(end, int) and end >= first else first + MAX_READ_LINES - 1
        last = min(last, first + MAX_READ_LINES - 1)
        try:
            with resolved.open("rb") as handle:
                data = handle.read(8 * 1024 * 1024)
        except OSError as exc:
            raise ToolError(f"{rel} cannot be read.") from exc
        if b"\x00" in data[:8000]:
            raise ToolError(f"{rel} is a binary file.")
        lines = data.decode("utf-8", errors="replace").splitlines()
        if first > len(lines):
            return f"{rel} has {len(lines)} lines."
        out: list[str] = [f"{rel} (lines {first}-{min(last, len(lines))} of {len(lines)}):"]
        size = len(out[0])
        for number in range(first, min(last, len(lines)) + 1):
            line = f"{number:>5}| {lines[number - 1]}"
            if size + len(line) > MAX_READ_CHARS:
                out.append(f"... [cut at {MAX_READ_CHARS} characters; read from line {number}]")
                break
            out.append(line)
            size += len(line) + 1
        return "\n".join(out)

    def list_dir(self, path: object = ".") -> str:
        rel, resolved = confine(self.repo, path if path is not None else ".", kind="dir")
        entries: list[str] = []
        try:
            children = sorted(resolved.iterdir(), key=lambda p: p.name)
        except OSError as exc:
            raise ToolError(f"{rel} cannot be listed.") from exc
        for child in children:
            if child.name in SKIP_DIRS or child.is_symlink():
                continue
            entries.append(child.name + ("/" if child.is_dir() else ""))
        shown = entries[:MAX_LIST_ENTRIES]
        if len(entries) > MAX_LIST_ENTRIES:
            shown.append(f"... and {len(entries) - MAX_LIST_ENTRIES} more")
        return f"{rel}/:\n" + "\n".join(shown) if shown else f"{rel}/ is empty."


def search_text(
    repo: Path, query: str, *, limit: int = MAX_SEARCH_RESULTS, scope: str | None = None
) -> list[tuple[str, int, str]]:
    """``(path, line, text)`` of lines holding ``query`` literally, in path order."""
    hits = _git_grep(repo, query, limit, scope) if (repo / ".git").exists() else None
    return hits if hits is not None else _walk_grep(repo, query, limit, scope)


def _git_grep(
    repo: Path, query: str, limit: int, scope: str | None
) -> list[tuple[str, int, str]] | None:
    git = shutil.which("git")
    if git is None:
        return None
    argv = [
        git,
        *("-c", "core.fsmonitor=false"),
        *("-c", "core.hooksPath=/dev/null"),
        *("-c", "grep.fallbackToNoIndex=false"),
        "grep",
        "-n",
        "-I",
        "--no-color",
        "--no-textconv",
        "-F",
        "-e",
        query,
        "--",
        scope or ".",
    ]
    env = {  # nothing of the service's environment; git is called by its full path
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_TERMINAL_PROMPT": "0",
        "HOME": os.devnull,
    }
    try:
        result = subprocess.run(  # noqa: S603 - a fixed argv, no shell
            argv, cwd=repo, env=env, capture_output=True, timeout=GREP_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode not in (0, 1):
        return None  # not a usable repository: walk instead
    hits: list[tuple[str, int, str]] = []
    for raw in result.stdout.decode("utf-8", errors="replace").splitlines():
        path, _, rest = raw.partition(":")
        number, _, text = rest.partition(":")
        if number.isdigit() and not any(part in SKIP_DIRS for part in Path(path).parts):
            hits.append((path, int(number), text))
            if len(hits) >= limit:
                break
    return hits


def _walk_grep(repo: Path, query: str, limit: int, scope: str | None) -> list[tuple[str, int, str]]:
    hits: list[tuple[str, int, str]] = []
    for rel in list_files(repo):
        if scope and not (rel == scope or rel.startswith(scope.rstrip("/") + "/")):
            continue
        path = repo / rel
        try:
            if path.stat().st_size > MAX_SEARCHED_FILE_BYTES:
                continue
            data = path.read_bytes()
        except OSError:
            continue
        if b"\x00" in data[:8000] or query.encode() not in data:
            continue
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if query in line:
                hits.append((rel, number, line))
                if len(hits) >= limit:
                    return hits
    return hits
