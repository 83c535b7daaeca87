"""FixAgent: localizes the fault and asks the model for a fix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.agents import repo_context
from app.agents.base import EDIT_FORMAT, Agent

SYSTEM_PROMPT = f"""You are FixAgent, a careful software engineer. A test command fails because
of a bug. Find the fault and fix it in the source code with the smallest correct change.
Do not modify or delete existing tests: they define the expected behaviour.

{EDIT_FORMAT}"""


@dataclass(frozen=True)
class FixRequest:
    repo: Path
    bug_description: str
    test_command: str
    failure_output: str
    feedback: str | None = None


class FixAgent(Agent):
    name = "FixAgent"

    def build_prompt(self, request: FixRequest) -> str:
        files = repo_context.list_files(request.repo)
        relevant = repo_context.relevant_files(
            request.repo, files, request.failure_output, request.bug_description
        )
        parts = [
            f"## Bug report\n{request.bug_description}",
            f"## Test command\n`{request.test_command}`",
            f"## Failing test output (tail)\n```\n{request.failure_output[-6000:]}\n```",
            f"## Repository map\n{repo_context.repo_map(request.repo, files)}",
        ]
        if relevant:
            parts.append("## Relevant files\n" + repo_context.render_files(request.repo, relevant))
        if request.feedback:
            parts.append(f"## Your previous attempt did not work\n{request.feedback}")
        parts.append("Reply with the edits that fix the bug.")
        return "\n\n".join(parts)

    def propose_fix(self, request: FixRequest) -> str:
        return self.ask(SYSTEM_PROMPT, self.build_prompt(request))
