"""What a localization shows the model, within a token budget filled by priority.

Pieces, most important first: the code the previous attempt changed; the definitions the bug is
most likely in, whole and with line numbers; the failing tests' bodies; windows around the lines
a traceback names outside them; the functions they call; their callers and callees as
signatures; and a ranked repository map of signatures with what is left. A piece that does not
fit is shown compacted (a long definition as its signature and the windows that matter) or
listed by name under "Not shown", so the model can ask for it. Tokens are estimated offline
(four characters a token, as the usage tracker estimates them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from app.agents.localize import CONFIDENT_SCORE, Finding, Localization
from app.agents.repo_context import is_test_path
from app.agents.repo_map import rank_symbols, render_map
from app.agents.symbols import RepoIndex, Symbol
from app.agents.tokens import estimate_tokens

DEFAULT_BUDGET_TOKENS = 6000
MAP_MAX_TOKENS = 1024
MAP_RESERVE_TOKENS = 384
MAX_TEST_LINES = 40
MAX_WHOLE_LINES = 200
MAX_WHOLE_CLASS_LINES = 80
MAX_CALLEE_LINES = 60
MAX_CALLEES = 8
MAX_DEFINITIONS = 12
WINDOW_RADIUS = 6
LINE_NUMBER_NOTE = "Code is shown with its line numbers (`  12| `); they are not part of the file."

SECTION_TITLES = {
    "touched": "Code your previous edit changed (the edit was reverted; this is the code now)",
    "definitions": "Where the bug most likely is",
    "tests": "Failing tests",
    "windows": "Lines the tracebacks name",
    "callees": "Functions those call",
    "neighbours": "Callers and callees (signatures)",
    "map": "Repository map (signatures ranked by relevance)",
    "left_out": "Not shown for lack of room (ask for them by name, path and lines)",
}


@dataclass(frozen=True, slots=True)
class Piece:
    section: str
    name: str
    text: str
    priority: float
    compact: str | None = None
    """A smaller rendering to use when ``text`` does not fit."""
    lines: tuple[str, int, int] | None = None
    """(path, first, last): what it shows, so that nothing is shown twice."""
    symbol: Symbol | None = None


@dataclass
class PromptContext:
    sections: dict[str, str]
    """Section key (see ``SECTION_TITLES``) to its rendered body; empty sections are absent."""
    tokens: int
    shown: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)

    def render(self, keys: Iterable[str]) -> list[str]:
        return [
            f"## {SECTION_TITLES[key]}\n{self.sections[key]}"
            for key in keys
            if self.sections.get(key)
        ]


def render_context(loc: Localization, budget_tokens: int) -> PromptContext:
    """Fill ``budget_tokens`` with the localization's pieces by priority."""
    pieces = sorted(_pieces(loc), key=lambda p: p.priority)
    chosen: list[Piece] = []
    left_out: list[str] = []
    covered: list[tuple[str, int, int]] = []
    used = MAP_RESERVE_TOKENS if loc.index.modules else 0  # the map always gets some room
    for piece in pieces:
        if piece.lines and _is_covered(piece.lines, covered):
            continue
        for text in (piece.text, piece.compact):
            if text is None:
                continue
            cost = estimate_tokens(text) + 2
            if used + cost <= budget_tokens:
                used += cost
                chosen.append(
                    Piece(piece.section, piece.name, text, piece.priority, symbol=piece.symbol)
                )
                if piece.lines and text is piece.text:
                    covered.append(piece.lines)
                break
        else:
            left_out.append(piece.name)
    sections: dict[str, list[str]] = {}
    for piece in chosen:
        sections.setdefault(piece.section, []).append(piece.text)
    rendered = {key: "\n\n".join(texts) for key, texts in sections.items()}
    used -= MAP_RESERVE_TOKENS if loc.index.modules else 0

    shown = {p.symbol for p in chosen if p.symbol is not None}
    map_budget = min(MAP_MAX_TOKENS, budget_tokens - used - estimate_tokens(str(left_out)) - 50)
    if map_budget > 100 and loc.index.modules:
        ranked = rank_symbols(loc.index, loc.seed_paths, loc.focus_names)
        text, files_left_out = render_map(ranked, map_budget - 20, skip=shown)
        if text:
            more = (
                f"\n({len(files_left_out)} more files with definitions)" if files_left_out else ""
            )
            rendered["map"] = f"{LINE_NUMBER_NOTE}\n{text}{more}"
            used += estimate_tokens(rendered["map"]) + 2
    if left_out:
        rendered["left_out"] = "\n".join(f"- {name}" for name in left_out)
        used += estimate_tokens(rendered["left_out"]) + 2
    return PromptContext(rendered, used, [p.name for p in chosen], left_out)


def _is_covered(lines: tuple[str, int, int], covered: list[tuple[str, int, int]]) -> bool:
    path, first, last = lines
    return any(p == path and a <= first and last <= b for p, a, b in covered)


def _pieces(loc: Localization) -> list[Piece]:
    index = loc.index
    pieces: list[Piece] = []
    for rank, finding in enumerate(loc.touched):
        pieces.append(_definition_piece(index, finding, "touched", rank))
    for rank, finding in enumerate(loc.findings[:MAX_DEFINITIONS]):
        if finding.score < CONFIDENT_SCORE:
            priority = 42 + rank  # weak evidence: after what the strong findings call
        else:
            priority = 10 + rank if rank < 3 else 15 + rank
        pieces.append(_definition_piece(index, finding, "definitions", priority))
    for rank, test in enumerate(loc.tests):
        focus = {f.line for f in loc.frames if f.symbol == test}
        compact = _compact(index, test, focus)
        long = test.end - test.start + 1 > MAX_TEST_LINES
        body = compact if long else _numbered(index, test.path, test.start, test.end)
        if body:
            pieces.append(
                Piece(
                    "tests",
                    _name(test),
                    f"### {_name(test)}\n{body}",
                    13 if rank == 0 else 20 + rank,
                    compact=None if long else f"### {_name(test)}\n{compact}",
                    lines=None if long else (test.path, test.start, test.end),
                    symbol=test,
                )
            )
    for rank, frame in enumerate(loc.frames):
        first, last = max(1, frame.line - WINDOW_RADIUS), frame.line + WINDOW_RADIUS
        body = _numbered(index, frame.path, first, last)
        if body:
            name = f"{frame.path}:{first}-{last}"
            pieces.append(
                Piece(
                    "windows",
                    name,
                    f"### {name} (line {frame.line})\n{body}",
                    14 if frame.deepest else 30 + rank * 0.1,
                    lines=(frame.path, frame.line, frame.line),
                )
            )
    for rank, hit in enumerate(loc.text_hits):
        first, last = max(1, hit.line - 2), hit.line + 30
        body = _numbered(index, hit.path, first, last)
        if body:
            name = f"{hit.path}:{first}-{last} {hit.name}"
            pieces.append(Piece("definitions", name, f"### {name}\n{body}", 16 + rank * 0.1))
    pieces += _neighbour_pieces(loc)
    return pieces


def _neighbour_pieces(loc: Localization) -> list[Piece]:
    """What the top findings call (two calls deep, the more relevant first) and their callers."""
    index = loc.index
    pieces: list[Piece] = []
    known = {f.symbol for f in loc.findings}
    signatures: dict[Symbol, str] = {}
    frontier = [f.symbol for f in loc.findings[:3]]
    seen = set(frontier)
    for depth in (1, 2):
        reached: list[tuple[Symbol, Symbol]] = []
        for parent in frontier:
            for callee in index.callees(parent):
                if callee not in seen and not is_test_path(callee.path):
                    seen.add(callee)
                    reached.append((callee, parent))
        reached.sort(key=lambda item: -loc.relevance.get(item[0], 0.0))
        for rank, (callee, parent) in enumerate(reached[:MAX_CALLEES]):
            signatures.setdefault(callee, f"{_name(callee)}: {callee.signature}")
            if callee in known or callee.end - callee.start >= MAX_CALLEE_LINES:
                continue
            body = _numbered(index, callee.path, callee.start, callee.end)
            pieces.append(
                Piece(
                    "callees",
                    _name(callee),
                    f"### {_name(callee)} (called by {parent.qualname})\n{body}",
                    35 + depth * 5 + rank * 0.1,  # 40: one call away, 45: two
                    lines=(callee.path, callee.start, callee.end),
                    symbol=callee,
                )
            )
        frontier = [callee for callee, _ in reached[:MAX_CALLEES]]
    for finding in loc.findings[:3]:
        for caller in index.callers(finding.symbol, limit=5):
            if caller not in known:
                signatures.setdefault(caller, f"{_name(caller)}: {caller.signature}")
    if signatures:
        text = "\n".join(sorted(signatures.values()))
        pieces.append(Piece("neighbours", "callers and callees", text, 38))
    return pieces


def _definition_piece(index: RepoIndex, finding: Finding, section: str, priority: float) -> Piece:
    symbol = finding.symbol
    why = "; ".join(finding.reasons[:3])
    head = f"### {_name(symbol)} ({why})" if why else f"### {_name(symbol)}"
    too_long = symbol.end - symbol.start + 1 > (
        MAX_WHOLE_CLASS_LINES if symbol.kind == "class" else MAX_WHOLE_LINES
    )
    compact = _compact(index, symbol, finding.lines)
    whole = None if too_long else _numbered(index, symbol.path, symbol.start, symbol.end)
    context = _owner_line(index, symbol)
    text = f"{head}\n{context}{whole}" if whole else f"{head}\n{context}{compact}"
    return Piece(
        section,
        _name(symbol),
        text,
        priority,
        compact=f"{head}\n{context}{compact}" if whole else None,
        lines=(symbol.path, symbol.start, symbol.end) if whole else None,
        symbol=symbol,
    )


def _owner_line(index: RepoIndex, symbol: Symbol) -> str:
    """The class line above a method, so that the model knows where it is."""
    if symbol.kind != "method" or symbol.owner is None:
        return ""
    for candidate in index.by_name.get(symbol.owner.rsplit(".", 1)[-1], []):
        if candidate.path == symbol.path and candidate.start <= symbol.start <= candidate.end:
            return f"{candidate.start:>5}| {_line(index, symbol.path, candidate.start)}\n  ...\n"
    return ""


def _compact(index: RepoIndex, symbol: Symbol, focus: set[int]) -> str:
    """A definition too long to show whole: its first lines, its members' signatures (for a
    class) and windows around the lines that matter."""
    keep: set[int] = set(range(symbol.start, min(symbol.end, symbol.start + 5) + 1))
    for line in focus:
        keep.update(range(max(symbol.start, line - WINDOW_RADIUS), line + WINDOW_RADIUS + 1))
    module = index.modules.get(symbol.path)
    if module is not None and symbol.kind == "class":
        keep.update(
            s.start
            for s in module.symbols
            if s.owner == symbol.qualname and symbol.start <= s.start <= symbol.end
        )
    rows: list[str] = []
    previous = symbol.start - 1
    for number in sorted(n for n in keep if symbol.start <= n <= symbol.end):
        if number > previous + 1:
            rows.append("  ...")
        rows.append(f"{number:>5}| {_line(index, symbol.path, number)}")
        previous = number
    if previous < symbol.end:
        rows.append(f"  ... (to line {symbol.end})")
    return "\n".join(rows)


def _numbered(index: RepoIndex, path: str, first: int, last: int) -> str:
    lines = index.lines(path)
    if not lines or first > len(lines):
        return ""
    last = min(last, len(lines))
    return "\n".join(f"{n:>5}| {lines[n - 1]}" for n in range(first, last + 1))


def _line(index: RepoIndex, path: str, number: int) -> str:
    lines = index.lines(path) or []
    return lines[number - 1] if 0 < number <= len(lines) else ""


def _name(symbol: Symbol) -> str:
    return f"{symbol.path}:{symbol.start}-{symbol.end} {symbol.qualname}"
