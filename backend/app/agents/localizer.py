"""Localizer: for models without tool calls, one Agentless-style call that picks the files and
functions to fix from a ranked map of the repository, when the deterministic pass found none on
strong evidence. Its calls carry their own agent label."""

from __future__ import annotations

import re

from openai.types.chat import ChatCompletion

from app.agents.base import Agent
from app.agents.localize import Localization
from app.agents.repo_map import rank_symbols, render_map
from app.agents.symbols import Symbol

MAP_BUDGET_TOKENS = 3000
MAX_PICKS = 5
_PICK = re.compile(r"(?P<path>[\w./-]+\.\w+)(?:\s*(?:::|:)\s*(?P<name>[A-Za-z_][\w.]*))?")

SYSTEM_PROMPT = """You are Localizer. From a bug report, the output of the failing tests and a
map of a repository's definitions (line number, signature), name the places that must be edited
to fix the bug. Reply with at most 5 lines in one ``` block, most likely first, each
`path/to/file.py::function` or `path/to/file.py::Class.method` (or only the path when no
definition fits), and nothing else."""


class Localizer(Agent):
    name = "Localizer"
    max_tokens = 512

    def pick(
        self, loc: Localization, bug_report: str, failure_excerpt: str
    ) -> tuple[list[Symbol], list[str], ChatCompletion]:
        """The definitions the model picked, the paths it named, and its response."""
        ranked = rank_symbols(loc.index, loc.seed_paths, loc.focus_names)
        repo_map, _ = render_map(ranked, MAP_BUDGET_TOKENS)
        prompt = (
            f"## Bug report\n{bug_report}\n\n"
            f"## Failing test output (excerpt)\n```\n{failure_excerpt}\n```\n\n"
            f"## Repository map\n{repo_map}\n\n"
            "Which functions or classes must change to fix the bug?"
        )
        response = self.chat(
            [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        )
        text = response.choices[0].message.content or "" if response.choices else ""
        symbols, paths = parse_picks(loc, text)
        return symbols, paths, response


def parse_picks(loc: Localization, reply: str) -> tuple[list[Symbol], list[str]]:
    """Resolve ``path::name`` lines to definitions; paths named alone are returned apart."""
    symbols: list[Symbol] = []
    paths: list[str] = []
    for match in _PICK.finditer(reply):
        path = match.group("path").removeprefix("./")
        if path not in loc.index.file_set:
            continue
        name = match.group("name")
        module = loc.index.modules.get(path)
        found = (
            [s for s in module.symbols if s.qualname == name or s.qualname.endswith("." + name)]
            if module is not None and name
            else []
        )
        if found:
            symbols.extend(s for s in found[:2] if s not in symbols)
        elif path not in paths:
            paths.append(path)
        if len(symbols) + len(paths) >= MAX_PICKS:
            break
    return symbols, paths
