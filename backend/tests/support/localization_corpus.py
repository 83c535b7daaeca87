"""The localization corpus: real open-source projects (vendored under ``tests/agents/corpus/``
with their licences), one-line bugs stored as data (file, original line, buggy line), and bug
reports written as a user would. Shared by ``tests/agents/test_localization_corpus.py`` and
``bench/localization.py``.

A case is materialized as a git repository holding the buggy code (as a task's clone would);
its test file is run for real, and the output is what FixAgent gets.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[1] / "agents" / "corpus"
TEST_TIMEOUT_S = 300


@dataclass(frozen=True)
class BugCase:
    id: str
    project: str
    file: str
    original: str
    buggy: str
    tests: str
    report: str
    split: str
    """"dev": used while localization was built; "heldout": written after, measured as is."""
    env: dict[str, str] = field(default_factory=dict)

    @property
    def test_command(self) -> str:
        prefix = " ".join(f"{k}={v}" for k, v in self.env.items())
        command = f"python -m pytest -q -p no:cacheprovider {self.tests}"
        return f"env {prefix} {command}" if prefix else command


@dataclass(frozen=True)
class Materialized:
    case: BugCase
    repo: Path
    line: int
    """The faulty line's number in the buggy file."""
    output: str
    """The whole output of the case's test command on the buggy code."""
    exit_code: int

    @property
    def summary(self) -> str:
        """What the orchestrator kept of the output before localization: its last 25 lines."""
        return "\n".join(self.output.rstrip().splitlines()[-25:])


def load_cases() -> list[BugCase]:
    data = json.loads((CORPUS / "cases.json").read_text())
    projects = data["projects"]
    return [BugCase(**case, env=projects[case["project"]]["env"]) for case in data["cases"]]


def materialize(case: BugCase, root: Path) -> Materialized:
    """The project with the bug put in, committed, and its test file's output."""
    repo = root / case.id
    shutil.copytree(CORPUS / case.project, repo, ignore=shutil.ignore_patterns("__pycache__"))
    target = repo / case.file
    lines = target.read_text().splitlines(keepends=True)
    matches = [i for i, line in enumerate(lines) if line.rstrip("\n") == case.original]
    assert len(matches) == 1, f"{case.id}: the original line occurs {len(matches)} times"
    lines[matches[0]] = case.buggy + "\n"
    target.write_text("".join(lines))
    git = ["git", "-c", "user.name=corpus", "-c", "user.email=corpus@localhost"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "buggy"]):
        subprocess.run([*git, *args], cwd=repo, check=True, capture_output=True)
    env = {
        **os.environ,
        **case.env,
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", case.tests],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=TEST_TIMEOUT_S,
        check=False,
    )
    return Materialized(
        case, repo, matches[0] + 1, result.stdout + result.stderr, result.returncode
    )


def shows_faulty_line(prompt: str, bug: Materialized) -> bool:
    """The faulty line is in the prompt as code with its line number (``  226| ...``)."""
    return f"{bug.line:>5}| {bug.case.buggy}" in prompt


def mentions_faulty_line(prompt: str, bug: Materialized) -> bool:
    """The faulty line's text is anywhere in the prompt (how the old, unnumbered prompt is
    measured)."""
    return bug.case.buggy.strip() in prompt
