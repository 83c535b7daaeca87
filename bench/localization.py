"""Localization recall and prompt size, before and after, on the corpus of real-code bugs; and
the time localization adds to a task on the largest repository of the corpus.

For each case (backend/tests/agents/corpus/cases.json) the project is copied, the one-line bug
put in and committed, and its test file run for real. Then FixAgent's first prompt is built:

- **before**: the prompt as FixAgent built it before localization (reproduced below from the
  previous ``fix_agent.py`` and ``repo_context.py``), from what the orchestrator passed it then,
  the last 25 lines of the output;
- **after**: ``compose_prompt`` on ``localize``, from the whole output, as the orchestrator
  passes it now; **after (tail)**: the same from the last 25 lines only.

Recall: the faulty line is in the prompt. Before, its text anywhere (the old prompt had no line
numbers); after, as code with its own line number (``  226| ...``), which is stricter. Tokens are
estimated as the usage tracker does (4 characters a token), for the user message.

    cd backend && .venv/bin/python ../bench/localization.py [--repeat 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BACKEND = Path(__file__).resolve().parents[1] / "backend"
sys.path.insert(0, str(BACKEND))

from app.agents.fix_agent import FixRequest, compose_prompt  # noqa: E402
from app.agents.localize import localize  # noqa: E402
from app.agents.prompt_context import DEFAULT_BUDGET_TOKENS  # noqa: E402
from app.agents.symbols import ModuleCache, build_index  # noqa: E402
from app.agents.tokens import estimate_tokens  # noqa: E402
from tests.support.localization_corpus import (  # noqa: E402
    Materialized,
    load_cases,
    materialize,
    mentions_faulty_line,
    shows_faulty_line,
)

# -- the prompt before localization (fix_agent.py and repo_context.py as they were) -----------

_MAX_MAP_FILES = 300
_MAX_FILES = 6
_MAX_FILE_CHARS = 16_000
_TRACE_PATH = re.compile(r'File "([^"]+)", line \d+|([\w./-]+\.\w+):\d+')
_MENTION = re.compile(r"[\w./-]+\.(?:py|js|ts|go|rs|java|rb|c|h|cpp|toml|cfg|ini|json|yaml|yml)\b")
_SKIP_DIRS = {".git", "__pycache__", "node_modules", ".venv", "venv", ".tox", "dist", "build"}


def _is_test_path(path: str) -> bool:
    parts = Path(path).parts
    name = parts[-1] if parts else path
    return (
        any(p in ("test", "tests", "testing") for p in parts[:-1])
        or name.startswith("test_")
        or name.endswith(("_test.py", ".test.js", ".test.ts", "_test.go"))
        or name == "conftest.py"
    )


def _list_files(repo: Path) -> list[str]:
    found: list[str] = []
    for path in sorted(repo.rglob("*")):
        rel = path.relative_to(repo)
        if any(part in _SKIP_DIRS for part in rel.parts) or not path.is_file() or path.is_symlink():
            continue
        found.append(rel.as_posix())
        if len(found) >= 5000:
            break
    return found


def _outline(path: Path) -> list[str]:
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


def _repo_map(repo: Path, files: list[str]) -> str:
    lines: list[str] = []
    for rel in files[:_MAX_MAP_FILES]:
        entry = rel
        if rel.endswith(".py"):
            names = _outline(repo / rel)
            if names:
                entry += ": " + ", ".join(names)
        lines.append(entry)
    if len(files) > _MAX_MAP_FILES:
        lines.append(f"... and {len(files) - _MAX_MAP_FILES} more files")
    return "\n".join(lines)


def _relevant_files(repo: Path, files: list[str], output: str, report: str) -> list[str]:
    known = set(files)
    by_name: dict[str, list[str]] = {}
    for rel in files:
        by_name.setdefault(Path(rel).name, []).append(rel)
    picked: list[str] = []

    def consider(candidate: str) -> None:
        candidate = candidate.strip()
        path = Path(candidate)
        rel = ""
        if path.is_absolute():
            try:
                rel = path.resolve().relative_to(repo.resolve()).as_posix()
            except (ValueError, OSError):
                rel = ""
        else:
            rel = path.as_posix().removeprefix("./")
        matches = [rel] if rel in known else by_name.get(Path(candidate).name, [])
        for match in matches[:2]:
            if match not in picked:
                picked.append(match)

    for match in _TRACE_PATH.finditer(output):
        consider(match.group(1) or match.group(2))
    for match in _MENTION.finditer(report):
        consider(match.group(0))
    picked.sort(key=_is_test_path)
    return picked[:_MAX_FILES]


def _render_files(repo: Path, paths: list[str]) -> str:
    blocks: list[str] = []
    for rel in paths:
        text = (repo / rel).read_text(encoding="utf-8", errors="replace")
        if len(text) > _MAX_FILE_CHARS:
            text = text[:_MAX_FILE_CHARS] + "\n... [truncated]"
        blocks.append(f"### {rel}\n```\n{text}\n```")
    return "\n\n".join(blocks)


def legacy_prompt(repo: Path, report: str, test_command: str, output: str) -> str:
    files = _list_files(repo)
    relevant = _relevant_files(repo, files, output, report)
    parts = [
        f"## Bug report\n{report}",
        f"## Test command\n`{test_command}`",
        f"## Failing test output (tail)\n```\n{output[-6000:]}\n```",
        f"## Repository map\n{_repo_map(repo, files)}",
    ]
    if relevant:
        parts.append("## Relevant files\n" + _render_files(repo, relevant))
    parts.append("Reply with the edits that fix the bug.")
    return "\n\n".join(parts)


# -- measuring ----------------------------------------------------------------------------------


def new_prompt(bug: Materialized, output: str, cache: ModuleCache | None = None) -> str:
    """FixAgent's first prompt (with ``cache``: as a retry builds it, parsing what changed)."""
    case = bug.case
    request = FixRequest(bug.repo, case.report, case.test_command, output)
    index = build_index(bug.repo, cache=cache)
    return compose_prompt(request, localize(bug.repo, case.report, output, index=index))[0]


def python_lines(repo: Path) -> int:
    return sum(
        len(p.read_text(errors="replace").splitlines())
        for p in repo.rglob("*.py")
        if ".git" not in p.parts
    )


def timed(func: Any, repeat: int) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU milliseconds of ``repeat`` calls (CPU time is what a busy, shared
    machine distorts least)."""
    wall, cpu = [], []
    for _ in range(repeat):
        started, started_cpu = time.perf_counter(), time.process_time()
        func()
        wall.append((time.perf_counter() - started) * 1000)
        cpu.append((time.process_time() - started_cpu) * 1000)
    return wall, cpu


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=30, help="timing samples on the largest repo")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    rows: list[dict[str, Any]] = []
    bugs: list[Materialized] = []
    test_seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in load_cases():
            started = time.perf_counter()
            bug = materialize(case, Path(tmp))
            test_seconds[case.id] = time.perf_counter() - started
            bugs.append(bug)
            before = legacy_prompt(bug.repo, case.report, case.test_command, bug.summary)
            after = new_prompt(bug, bug.output)
            after_tail = new_prompt(bug, bug.summary)
            rows.append(
                {
                    "case": case.id,
                    "split": case.split,
                    "before": mentions_faulty_line(before, bug),
                    "after": shows_faulty_line(after, bug),
                    "after_tail": shows_faulty_line(after_tail, bug),
                    "tokens_before": estimate_tokens(before),
                    "tokens_after": estimate_tokens(after),
                }
            )

        largest = max(bugs, key=lambda b: python_lines(b.repo))
        case = largest.case
        old_ms, old_cpu = timed(
            lambda: legacy_prompt(largest.repo, case.report, case.test_command, largest.summary),
            args.repeat,
        )
        new_ms, new_cpu = timed(lambda: new_prompt(largest, largest.output), args.repeat)
        warm: ModuleCache = {}
        new_prompt(largest, largest.output, warm)
        _, warm_cpu = timed(lambda: new_prompt(largest, largest.output, warm), args.repeat)
        median = statistics.median
        timing = {
            "repository": case.project,
            "case": case.id,
            "python_lines": python_lines(largest.repo),
            "before_ms_median": median(old_ms),
            "after_ms_median": median(new_ms),
            "after_ms_p90": sorted(new_ms)[int(0.9 * (len(new_ms) - 1))],
            "added_ms_median": median(new_ms) - median(old_ms),
            "before_cpu_ms_median": median(old_cpu),
            "after_cpu_ms_median": median(new_cpu),
            "added_cpu_ms_median": median(new_cpu) - median(old_cpu),
            "retry_cpu_ms_median": median(warm_cpu),
            "test_run_and_setup_s": test_seconds[case.id],
        }

    print("| case | split | before | after | after (tail only) | tokens before | tokens after |")
    print("|---|---|:-:|:-:|:-:|---:|---:|")
    for row in rows:
        marks = ["yes" if row[k] else "**no**" for k in ("before", "after", "after_tail")]
        print(
            f"| {row['case']} | {row['split']} | {' | '.join(marks)} | "
            f"{row['tokens_before']:,} | {row['tokens_after']:,} |"
        )
    summary: dict[str, Any] = {"cases": len(rows), "budget_tokens": DEFAULT_BUDGET_TOKENS}
    for key in ("before", "after", "after_tail"):
        summary[f"recall_{key}"] = sum(r[key] for r in rows) / len(rows)
    for split in ("dev", "heldout"):
        chosen = [r for r in rows if r["split"] == split]
        if chosen:
            summary[f"recall_after_{split}"] = sum(r["after"] for r in chosen) / len(chosen)
    for key in ("tokens_before", "tokens_after"):
        values = [r[key] for r in rows]
        summary[f"{key}_median"] = statistics.median(values)
        summary[f"{key}_max"] = max(values)
    print()
    print(json.dumps({"summary": summary, "timing": timing, "machine": machine()}, indent=2))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"rows": rows, "summary": summary, "timing": timing, "machine": machine()},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
