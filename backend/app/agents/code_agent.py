"""CodeAgent: applies the model's edits to the workspace, repairing a malformed reply once.

Edits must not touch tests that existed before the task (a fix that deletes the failing test is
not a fix); an edit that fails to apply is sent back to the model with the precise reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.agents.base import EDIT_FORMAT, Agent
from app.agents.edits import ApplyResult, EditError, apply_edits, parse_edits
from app.agents.repo_context import is_test_path

SYSTEM_PROMPT = f"""You are CodeAgent. Your previous edits could not be applied to the
repository. Rewrite them so that every SEARCH part matches the file exactly.

{EDIT_FORMAT}"""


@dataclass(frozen=True)
class ApplyOutcome:
    result: ApplyResult | None
    error: str | None
    repaired: bool = False


class CodeAgent(Agent):
    name = "CodeAgent"

    def apply_reply(
        self, repo: Path, reply: str, *, protected: frozenset[str], repair: bool = True
    ) -> ApplyOutcome:
        """Apply ``reply``; on failure ask the model once for corrected edits."""
        try:
            return ApplyOutcome(self._apply(repo, reply, protected), None)
        except EditError as first:
            if not repair:
                return ApplyOutcome(None, first.message)
            fixed = self.ask(
                SYSTEM_PROMPT,
                f"## Your edits\n{reply[-8000:]}\n\n## Why they failed\n{first.message}\n\n"
                "Reply with corrected edits.",
            )
            try:
                return ApplyOutcome(self._apply(repo, fixed, protected), None, repaired=True)
            except EditError as second:
                return ApplyOutcome(None, second.message, repaired=True)

    @staticmethod
    def _apply(repo: Path, reply: str, protected: frozenset[str]) -> ApplyResult:
        edits = parse_edits(reply)
        if not edits:
            raise EditError("The reply contained no edits. " + EDIT_FORMAT)
        touched = sorted({e.path for e in edits if e.path.removeprefix("./") in protected})
        if touched:
            raise EditError(
                f"Edits to existing tests are not allowed: {', '.join(touched)}. "
                "Fix the code under test instead."
            )
        return apply_edits(repo, edits)


def existing_tests(files: list[str]) -> frozenset[str]:
    return frozenset(f for f in files if is_test_path(f))
