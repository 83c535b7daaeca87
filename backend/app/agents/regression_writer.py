"""TestGenerator: writes a regression test when the suite does not already expose the bug."""

from __future__ import annotations

from pathlib import Path

from app.agents import repo_context
from app.agents.base import EDIT_FORMAT, Agent
from app.agents.localize import localize
from app.agents.prompt_context import DEFAULT_BUDGET_TOKENS, LINE_NUMBER_NOTE, render_context
from app.agents.symbols import build_index

REGRESSION_TEST_NAME = "test_asa_regression.py"

SYSTEM_PROMPT = f"""You are TestGenerator. The repository's tests pass, yet the bug report
describes a bug. Write ONE new test file that fails because of the bug and will pass once it is
fixed. Do not change any existing file.
{LINE_NUMBER_NOTE}

{EDIT_FORMAT}"""


class RegressionTestWriter(Agent):
    __test__ = False  # not a pytest test class
    name = "TestGenerator"

    def regression_test_path(self, repo: Path, files: list[str]) -> str:
        test_dirs = sorted({str(Path(f).parent) for f in files if repo_context.is_test_path(f)})
        folder = next((d for d in test_dirs if Path(d).name in ("tests", "test")), "")
        return f"{folder}/{REGRESSION_TEST_NAME}" if folder else REGRESSION_TEST_NAME

    def write_test(
        self, repo: Path, bug_description: str, test_command: str, output: str
    ) -> tuple[str, str]:
        """The model's reply and the path the new test should have."""
        files = repo_context.list_files(repo)
        path = self.regression_test_path(repo, files)
        loc = localize(repo, bug_description, output, index=build_index(repo, files))
        context = render_context(loc, DEFAULT_BUDGET_TOKENS)
        prompt = "\n\n".join(
            [
                f"## Bug report\n{bug_description}",
                f"## Test command (currently passing)\n`{test_command}`",
                *context.render(["definitions", "callees", "neighbours", "map", "left_out"]),
                f"Create the new test file `{path}` (empty SEARCH part).",
            ]
        )
        return self.ask(SYSTEM_PROMPT, prompt), path
