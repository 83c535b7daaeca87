"""Localization recall on real code: for bugs put into three vendored open-source projects and
reported as a user would, the faulty line is in FixAgent's first prompt, within its budget.

The floor (``RECALL_FLOOR``) and the measured figures are in docs/BENCHMARKS.md
(``bench/localization.py`` prints them, with the old prompt's for comparison).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app.agents.fix_agent import FixRequest, compose_prompt
from app.agents.localize import localize
from app.agents.prompt_context import DEFAULT_BUDGET_TOKENS
from app.agents.tokens import estimate_tokens
from tests.support.localization_corpus import (
    CORPUS,
    Materialized,
    load_cases,
    materialize,
    shows_faulty_line,
)

pytestmark = pytest.mark.slow  # 22 real test runs of three projects

RECALL_FLOOR = 0.9


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Materialized, str]]:
    """Every case materialized, its tests run, and FixAgent's first prompt for it."""
    root = tmp_path_factory.mktemp("corpus")
    with ThreadPoolExecutor(max_workers=2) as pool:  # the test runs are subprocesses
        bugs = list(pool.map(lambda case: materialize(case, root), load_cases()))
    built = []
    for bug in bugs:
        case = bug.case
        request = FixRequest(bug.repo, case.report, case.test_command, bug.output)
        prompt, _ = compose_prompt(request, localize(bug.repo, case.report, bug.output))
        built.append((bug, prompt))
    return built


def test_the_corpus_has_three_projects_with_their_licences_and_every_bug_fails_a_test(
    corpus: list[tuple[Materialized, str]],
) -> None:
    projects = {bug.case.project for bug, _ in corpus}
    assert len(projects) >= 3
    for project in projects:
        assert any(p.name.startswith("LICENSE") for p in (CORPUS / project).iterdir()), project
    for bug, _ in corpus:
        assert bug.exit_code == 1, f"{bug.case.id}: the bug does not fail its tests"
        assert "FAILED" in bug.output or "Error" in bug.output


def test_the_faulty_line_is_in_the_first_prompt_for_at_least_the_floor(
    corpus: list[tuple[Materialized, str]],
) -> None:
    missed = [bug.case.id for bug, prompt in corpus if not shows_faulty_line(prompt, bug)]

    recall = 1 - len(missed) / len(corpus)
    assert recall >= RECALL_FLOOR, f"recall {recall:.0%}; missed: {missed}"


def test_first_prompts_stay_within_the_token_budget(
    corpus: list[tuple[Materialized, str]],
) -> None:
    sizes = {bug.case.id: estimate_tokens(prompt) for bug, prompt in corpus}

    assert max(sizes.values()) <= DEFAULT_BUDGET_TOKENS, sizes


def test_bug_reports_give_no_file_or_line_hints() -> None:
    for case in load_cases():
        assert Path(case.file).name not in case.report, case.id
        assert " line " not in case.report, case.id
