"""Localization before repair: from a bug report and a test run to the definitions to show.

Deterministic and cheap: the signals (:mod:`app.agents.signals`) are resolved against the
repository's symbols (:mod:`app.agents.symbols`) and scored. A traceback frame inside a source
function weighs most (the deepest frame of each traceback more than the others), then the
functions the failing tests call (an operator calls its special method on the classes the test,
the report or the failure names; calling a class calls its ``__init__``), then the names the
report mentions; a name defined in many places weighs less in each. Lexical relevance
(:mod:`app.agents.lexical`) adds weak candidates. Names that the Python index cannot resolve
are looked up with Universal Ctags when it is installed, else by a plain-text search for their
definition. Nothing here calls a model.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from app.agents.lexical import query_text, rank_lexical
from app.agents.repo_context import is_test_path, list_files
from app.agents.signals import (
    Frame,
    TestId,
    failing_tests,
    mentioned_names,
    mentioned_paths,
    parse_frames,
)
from app.agents.symbols import RepoIndex, Symbol, build_index
from app.agents.tools import search_text

MAX_TESTS_SHOWN = 4
MAX_TEXT_SEARCH_NAMES = 8
MAX_TEXT_HITS = 12
TEXT_SEARCH_TIMEOUT_S = 10.0
CONFIDENT_SCORE = 4.0
AUTO = "auto"
LEXICAL_TOP = 5
LEXICAL_MIN = 0.5
LEXICAL_WEIGHT = 3.0
_CODE_SUFFIXES = (
    ".js", ".jsx", ".ts", ".tsx", ".go", ".rs", ".java", ".kt", ".rb", ".php", ".c", ".h",
    ".cc", ".cpp", ".hpp", ".cs", ".swift", ".scala",
)  # fmt: skip
_DIFF_FILE = re.compile(r"^--- (?:a/(?P<path>.+?)|/dev/null)\s*$")
_DIFF_HUNK = re.compile(r"^@@ -(?P<start>\d+)(?:,(?P<count>\d+))? \+\d+(?:,\d+)? @@")
_LIBRARY_PATH = re.compile(r"/(?:site-packages|dist-packages|lib/python\d[\d.]*)/")
_DEFINITION_LINE = r"(def|class|func|function|fn|fun|sub|struct|interface|type|impl|module)\s+{}\b"


@dataclass
class Finding:
    """A definition the bug may be in, with why it was picked and the lines a traceback names."""

    symbol: Symbol
    score: float = 0.0
    reasons: list[str] = field(default_factory=list)
    lines: set[int] = field(default_factory=set)

    def add(self, score: float, reason: str) -> None:
        self.score += score
        if reason not in self.reasons:
            self.reasons.append(reason)


@dataclass(frozen=True, slots=True)
class Location:
    """A line in the repository a traceback names (``symbol`` is None outside any function)."""

    path: str
    line: int
    deepest: bool
    symbol: Symbol | None


@dataclass(frozen=True, slots=True)
class TextHit:
    """A definition found by ctags or text search (languages the index does not parse)."""

    path: str
    line: int
    name: str


@dataclass
class Localization:
    index: RepoIndex
    frames: list[Location]
    tests: list[Symbol]
    findings: list[Finding]
    """Source (non-test) definitions, best first."""
    touched: list[Finding] = field(default_factory=list)
    """Definitions the previous attempt's edit changed (their current code)."""
    text_hits: list[TextHit] = field(default_factory=list)
    seed_paths: dict[str, float] = field(default_factory=dict)
    focus_names: set[str] = field(default_factory=set)
    relevance: dict[Symbol, float] = field(default_factory=dict)
    """Lexical relevance (0..1) of source definitions to the report and the failure."""

    @property
    def confident(self) -> bool:
        """Whether the deterministic pass found a source definition on strong evidence."""
        return any(f.score >= CONFIDENT_SCORE for f in self.findings) or any(
            not is_test_path(loc.path) for loc in self.frames
        )

    def pin(self, symbols: list[Symbol], reason: str) -> None:
        """Put ``symbols`` first (a localization call picked them)."""
        top = max((f.score for f in self.findings), default=0.0) + 10
        by_symbol = {f.symbol: f for f in self.findings}
        for rank, symbol in enumerate(symbols):
            finding = by_symbol.get(symbol) or Finding(symbol)
            finding.add(top - rank * 0.01, reason)
            if symbol not in by_symbol:
                self.findings.append(finding)
                by_symbol[symbol] = finding
            self.seed_paths[symbol.path] = self.seed_paths.get(symbol.path, 0.0) + top
        self.findings.sort(key=lambda f: -f.score)


def localize(
    repo: Path,
    bug_report: str,
    failure_output: str,
    *,
    previous_diff: str | None = None,
    index: RepoIndex | None = None,
) -> Localization:
    """Rank the repository's definitions by how surely the bug is in them."""
    index = index or build_index(repo)
    findings: dict[Symbol, Finding] = {}
    seeds: dict[str, float] = {}
    focus: set[str] = set()

    def credit(symbol: Symbol, score: float, reason: str) -> Finding:
        finding = findings.setdefault(symbol, Finding(symbol))
        finding.add(score, reason)
        seeds[symbol.path] = seeds.get(symbol.path, 0.0) + score
        return finding

    frames = _resolve_frames(index, parse_frames(failure_output))
    tests: list[Symbol] = []
    for loc in frames:
        seeds[loc.path] = seeds.get(loc.path, 0.0) + (2.0 if loc.deepest else 1.0)
        if loc.symbol is None:
            continue
        if is_test_path(loc.path):
            if loc.symbol.kind != "class" and loc.symbol not in tests:
                tests.append(loc.symbol)
            continue
        weight = 10.0 if loc.deepest else 6.0
        credit(loc.symbol, weight, f"traceback line {loc.line}").lines.add(loc.line)
        focus.add(loc.symbol.name)
    for test in _resolve_tests(index, failing_tests(failure_output)):
        if test not in tests:
            tests.append(test)
    tests = tests[:MAX_TESTS_SHOWN]

    types = _named_classes(index, bug_report + "\n" + failure_output)
    for test in tests:
        seeds[test.path] = seeds.get(test.path, 0.0) + 1.0
        for symbol, weight in _called_by_test(index, test, types):
            credit(symbol, weight, f"called by {test.qualname}")
            focus.add(symbol.name)

    unresolved: list[str] = []
    for mention in mentioned_names(bug_report):
        defs = [s for s in index.definitions(mention.name) if not is_test_path(s.path)]
        limit = 3 if mention.weight < 2 else 6
        if not defs:
            if mention.weight >= 3:
                unresolved.append(mention.name.rsplit(".", 1)[-1])
            continue
        if len(defs) > limit:
            continue
        for symbol in defs:
            credit(symbol, mention.weight / len(defs), f"named in the bug report ({mention.name})")
        focus.add(mention.name.rsplit(".", 1)[-1])
    for path in mentioned_paths(bug_report):
        rel = _to_repo_path(index, path)
        if rel:
            seeds[rel] = seeds.get(rel, 0.0) + 3.0

    relevance = dict(rank_lexical(index, query_text(bug_report, failure_output)))
    strong = max((f.score for f in findings.values()), default=0.0)
    for symbol, score in sorted(relevance.items(), key=lambda item: -item[1])[:LEXICAL_TOP]:
        if score >= LEXICAL_MIN:
            # Weak on its own: it ranks below any strong finding, and counts less when there are.
            weight = LEXICAL_WEIGHT * score * (0.5 if strong >= CONFIDENT_SCORE else 1.0)
            credit(symbol, weight, "its words match the report")

    touched = _touched(index, previous_diff) if previous_diff else []
    text_hits: list[TextHit] = []
    if unresolved and (index.unparsed or any(f.endswith(_CODE_SUFFIXES) for f in index.files)):
        text_hits = search_definitions(repo, unresolved[:MAX_TEXT_SEARCH_NAMES])
        for hit in text_hits:
            seeds[hit.path] = seeds.get(hit.path, 0.0) + 2.0
    ranked = sorted(findings.values(), key=lambda f: (-f.score, f.symbol.path, f.symbol.start))
    return Localization(index, frames, tests, ranked, touched, text_hits, seeds, focus, relevance)


def _resolve_frames(index: RepoIndex, frames: list[Frame]) -> list[Location]:
    found: list[Location] = []
    for frame in frames:
        rel = _to_repo_path(index, frame.path)
        if not rel:
            continue
        symbol = index.enclosing(rel, frame.line)
        found.append(Location(rel, frame.line, frame.deepest, symbol))
    return found


def _to_repo_path(index: RepoIndex, raw: str) -> str | None:
    """``raw`` as a listed repository path, or None (a library outside the repository)."""
    raw = raw.strip().replace("\\", "/")
    path = PurePosixPath(raw)
    if path.is_absolute():
        for root in {index.repo, index.repo.resolve()}:
            try:
                rel = PurePosixPath(Path(raw).relative_to(root).as_posix())
            except ValueError:
                continue
            if rel.as_posix() in index.file_set:
                return rel.as_posix()
        if _LIBRARY_PATH.search(raw):
            return None
        # A copy of the repository elsewhere (the tests ran on a scratch copy): the longest tail
        # of the path that is a repository file.
        parts = path.parts[1:]
        for start in range(len(parts)):
            tail = "/".join(parts[start:])
            if tail in index.file_set:
                return tail
        return None
    rel_text = path.as_posix().removeprefix("./")
    if rel_text in index.file_set:
        return rel_text
    if ".." in path.parts:
        return None
    # Relative to another directory (pytest's rootdir, a package root): a unique suffix match.
    matches = [f for f in index.files if f.endswith("/" + rel_text)]
    return matches[0] if len(matches) == 1 else None


def _resolve_tests(index: RepoIndex, tests: list[TestId]) -> list[Symbol]:
    found: list[Symbol] = []
    for test in tests:
        candidates = [s for s in index.by_name.get(test.name, []) if is_test_path(s.path)]
        if test.path:
            rel = _to_repo_path(index, test.path)
            candidates = [s for s in candidates if s.path == rel] or candidates
        if test.owner:
            candidates = [
                s for s in candidates if (s.owner or "").endswith(test.owner)
            ] or candidates
        for symbol in candidates[:2]:
            if symbol not in found:
                found.append(symbol)
    return found


def _named_classes(index: RepoIndex, text: str) -> set[str]:
    """Source classes whose names occur in ``text`` (the values in an assertion, a report)."""
    found = set(re.findall(r"[A-Z]\w+", text))
    return {
        name
        for name in found
        if any(s.kind == "class" and not is_test_path(s.path) for s in index.by_name.get(name, []))
    }


def _called_by_test(index: RepoIndex, test: Symbol, types: set[str]) -> list[tuple[Symbol, float]]:
    """Source definitions a test calls, through its helpers too, with a weight each.

    An operator the test uses counts as a call of that special method on the classes the test,
    the report or the failure names; calling a class counts as calling its ``__init__``."""
    weighted: list[tuple[Symbol, float]] = []
    helpers: list[Symbol] = []
    for name in sorted(test.calls):
        dunder = name.startswith("__") and name.endswith("__")
        defs = index.by_name.get(name, [])
        if dunder:
            classes = test.names | types
            defs = [d for d in defs if d.owner and d.owner.rsplit(".", 1)[-1] in classes]
        defs = defs + [c for d in defs if (c := index.constructor(d)) is not None]
        sources = [d for d in defs if not is_test_path(d.path)]
        helpers += [
            d
            for d in defs
            if is_test_path(d.path) and not d.name.startswith("test") and d.kind == "function"
        ]
        if sources and len(sources) <= 5:
            weighted += [(d, (4.0 if dunder else 5.0) / len(sources)) for d in sources]
    for helper in helpers[:3]:
        for name in sorted(helper.calls):
            sources = [d for d in index.by_name.get(name, []) if not is_test_path(d.path)]
            if sources and len(sources) <= 3 and not name.startswith("__"):
                weighted += [(d, 3.0 / len(sources)) for d in sources]
    return weighted


def _touched(index: RepoIndex, diff: str) -> list[Finding]:
    """The current definitions (or lines) that ``diff``'s hunks changed."""
    touched: dict[Symbol, Finding] = {}
    path: str | None = None
    for line in diff.splitlines():
        head = _DIFF_FILE.match(line)
        if head:
            path = head.group("path")
            continue
        hunk = _DIFF_HUNK.match(line)
        if not hunk or path is None or path not in index.modules:
            continue
        start = int(hunk.group("start"))
        count = int(hunk.group("count") or 1)
        for number in range(start, start + max(count, 1)):
            symbol = index.enclosing(path, number)
            if symbol is None:
                continue
            finding = touched.setdefault(symbol, Finding(symbol))
            finding.add(0.0, "changed by your previous edit")
            finding.lines.add(number)
    return list(touched.values())


def search_definitions(repo: Path, names: list[str], *, ctags: str | None = AUTO) -> list[TextHit]:
    """Where ``names`` are defined in files the Python index does not cover: with Universal Ctags
    (``ctags``: its path; by default the installed one, if any), else ``git grep`` (or a walk
    of the files) for a definition-looking line."""
    program = _universal_ctags() if ctags == AUTO else ctags
    hits = _ctags(program, repo, names) if program else None
    if hits is None:
        hits = _grep_definitions(repo, names)
    return hits[:MAX_TEXT_HITS]


@functools.cache
def _universal_ctags() -> str | None:
    found = shutil.which("ctags")
    if found is None:
        return None
    try:
        version = subprocess.run(  # noqa: S603 - a fixed argv, no shell
            [found, "--version"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return found if "Universal Ctags" in version else None


def _ctags(ctags: str, repo: Path, names: list[str]) -> list[TextHit] | None:
    files = [f for f in list_files(repo) if f.endswith(_CODE_SUFFIXES)]
    if not files:
        return []
    try:
        result = subprocess.run(  # noqa: S603 - a fixed argv, no shell
            # --options=NONE: no option files, not even the repository's own .ctags.d/
            [ctags, "--options=NONE", "--output-format=json", "--fields=+n", "-f", "-", "-L", "-"],
            input="\n".join(files),
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=TEXT_SEARCH_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    wanted = set(names)
    hits: list[TextHit] = []
    for line in result.stdout.splitlines():
        try:
            tag = json.loads(line)
        except ValueError:
            continue
        if tag.get("name") in wanted and isinstance(tag.get("line"), int):
            hits.append(TextHit(str(tag["path"]), tag["line"], str(tag["name"])))
    return hits


def _grep_definitions(repo: Path, names: list[str]) -> list[TextHit]:
    hits: list[TextHit] = []
    for name in names:
        pattern = re.compile(_DEFINITION_LINE.format(re.escape(name)))
        for path, number, text in search_text(repo, name, limit=200):
            if pattern.search(text) and not path.endswith(".py"):
                hits.append(TextHit(path, number, name))
    return hits
