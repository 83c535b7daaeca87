"""FixAgent's tools on a real repository: answers, caps, and paths that must not leave it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from app.agents.tools import MAX_READ_CHARS, MAX_READ_LINES, RepoTools


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    (root / "pkg" / "big.py").write_text("".join(f"x_{n} = {n}\n" for n in range(2000)))
    (root / "README.md").write_text("add() adds numbers\n")
    (tmp_path / "secret.txt").write_text("TOP SECRET\n")
    (root / "escape").symlink_to(tmp_path / "secret.txt")
    (root / "outside").symlink_to(tmp_path)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run(["git", "-C", str(root), "add", "-A"], check=True)
    return root


def call(repo: Path, name: str, **arguments: object) -> str:
    return RepoTools(repo).run(name, json.dumps(arguments))


def test_read_file_returns_numbered_lines_of_the_requested_range(repo: Path) -> None:
    answer = call(repo, "read_file", path="pkg/calc.py", start=2, end=2)

    assert answer == "pkg/calc.py (lines 2-2 of 2):\n    2|     return a - b"


def test_read_file_is_capped_in_lines_and_characters(repo: Path) -> None:
    answer = call(repo, "read_file", path="pkg/big.py", start=1, end=5000)

    assert len(answer) <= MAX_READ_CHARS + 200
    assert f"{MAX_READ_LINES:>5}| x_{MAX_READ_LINES - 1} = " in answer
    assert f"{MAX_READ_LINES + 1:>5}| " not in answer


@pytest.mark.parametrize(
    "path",
    ["../secret.txt", "/etc/passwd", "escape", "outside/secret.txt", ".git/config", "pkg/../../x"],
)
def test_paths_outside_the_repository_are_refused(repo: Path, path: str) -> None:
    answer = call(repo, "read_file", path=path)

    assert answer.startswith("Error: ")
    assert "TOP SECRET" not in answer and "root:" not in answer


def test_list_dir_lists_a_folder_without_git_or_following_symlinks(repo: Path) -> None:
    assert call(repo, "list_dir", path=".") == "./:\nREADME.md\npkg/"
    assert call(repo, "list_dir", path="outside").startswith("Error: ")


@pytest.mark.parametrize("with_git", [True, False])
def test_search_code_finds_literal_text_with_and_without_git(repo: Path, with_git: bool) -> None:
    if not with_git:
        subprocess.run(["rm", "-rf", str(repo / ".git")], check=True)

    answer = call(repo, "search_code", query="return a - b")

    assert answer == "pkg/calc.py:2: return a - b"
    assert call(repo, "search_code", query="add", path="pkg") == "pkg/calc.py:1: def add(a, b):"
    assert call(repo, "search_code", query="TOP SECRET") == "No matches for 'TOP SECRET'."


def test_malformed_calls_get_an_error_the_model_can_act_on(repo: Path) -> None:
    tools = RepoTools(repo)

    assert tools.run("read_file", "{not json").startswith("Error: ")
    assert tools.run("delete_everything", "{}").startswith("Error: there is no tool")
    assert tools.run("search_code", '{"query": ""}').startswith("Error: ")
