"""What a bug report and a test run say about where the bug is: traceback frames, failing tests
and the names a user mentions. Pure text parsing; nothing here reads the repository.

Frames are read in every form a Python run prints them (``File "x.py", line 3, in f``; pytest's
``x.py:3: in f`` and ``x.py:3: AssertionError``), and ``path:line`` for other languages. Failing
tests come from pytest's summary, its section headers and verbose lines, and unittest's
``FAIL: test (module.Class)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_FRAMES = 400
MAX_TESTS = 50

_PY_FRAME = re.compile(r'File "(?P<path>[^"\n]+)", line (?P<line>\d+)(?:, in (?P<func>[^\s]+))?')
_PYTEST_FRAME = re.compile(
    r"^(?P<path>[^\s:\"'<>][^:\n\"']*?\.[A-Za-z]\w{0,5}):(?P<line>\d+):"
    r"(?: in (?P<func>[\w.<>]+)\s*$| \S)",
    re.MULTILINE,
)
_ANY_FRAME = re.compile(r"(?<![\w/.-])(?P<path>[\w./-]*\w\.[A-Za-z]\w{0,5}):(?P<line>\d+)(?!\d)")
_SECTION = re.compile(
    r"^(?:_{3,} .* _{3,}|Traceback \(most recent call last\):|={3,} .* ={3,})$", re.MULTILINE
)
_PYTEST_NODEID = re.compile(
    r"^(?:(?:FAILED|ERROR) (?P<a>[^\s]+::[^\s]+?)(?: - .*)?"
    r"|(?P<b>[^\s]+::[^\s]+) (?:FAILED|ERROR)\b.*)$",
    re.MULTILINE,
)
_PYTEST_HEADER = re.compile(r"^_{3,} (?P<name>(?:\w+\.)*test\w*(?:\[.*\])?) _{3,}$", re.MULTILINE)
_UNITTEST = re.compile(r"^(?:FAIL|ERROR): (?P<name>\w+) \((?P<where>[\w.]+)\)", re.MULTILINE)

_BACKTICKED = re.compile(r"`([^`\n]{1,200})`")
_CALL = re.compile(r"(?<![\w.])([A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)*)\s?\(")
_DOTTED = re.compile(r"(?<![\w.])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)")
_WORD = re.compile(r"(?<![\w.])([A-Za-z_]\w{2,})")
_PATH = re.compile(r"(?<![\w.])([\w-]+(?:/[\w.-]+)*\.(?:py|pyi|js|ts|go|rs|java|rb|c|h|cpp))\b")
_STOPWORDS_TEXT = """
    the and for with that this from when what which where while returns return returned should
    would could instead expected expect gives given give but not are was were has have had into
    than then them they there their its it's also only just like some any all each every more
    most less very wrong right result results value values output input call calls called
    function method class bug error fails failed failing works work working test tests true
    false none null string number list dict example please thanks version using used use
"""
_STOPWORDS = frozenset(_STOPWORDS_TEXT.split())


@dataclass(frozen=True, slots=True)
class Frame:
    """One traceback entry; ``deepest`` marks the last frame of its traceback."""

    path: str
    line: int
    function: str | None = None
    deepest: bool = False


@dataclass(frozen=True, slots=True)
class TestId:
    """A failing test: its file when known, its function and its class when it has one."""

    __test__ = False  # not a pytest test class

    path: str | None
    name: str
    owner: str | None = None


@dataclass(frozen=True, slots=True)
class Mention:
    """A name in the bug report; ``weight`` says how surely it is code (backticks, a call)."""

    name: str
    weight: float


def parse_frames(output: str) -> list[Frame]:
    """Every frame of every traceback in ``output``, in order, without repeats."""
    frames: list[Frame] = []
    seen: set[tuple[str, int]] = set()
    for chunk in _SECTION.split(output):
        found: list[tuple[int, Frame]] = []
        for pattern in (_PY_FRAME, _PYTEST_FRAME, _ANY_FRAME):
            for match in pattern.finditer(chunk):
                path, line = match.group("path").strip(), int(match.group("line"))
                func = match.groupdict().get("func")
                if path.startswith("<") or line <= 0:
                    continue
                found.append((match.start(), Frame(path, line, func)))
        found.sort(key=lambda item: item[0])
        chunk_frames: list[Frame] = []
        chunk_seen: set[tuple[str, int]] = set()
        for _, frame in found:
            key = (frame.path, frame.line)
            if key in chunk_seen:
                continue
            chunk_seen.add(key)
            chunk_frames.append(frame)
        if chunk_frames:
            last = chunk_frames[-1]
            chunk_frames[-1] = Frame(last.path, last.line, last.function, deepest=True)
        for frame in chunk_frames:
            key = (frame.path, frame.line)
            if key not in seen or frame.deepest:
                seen.add(key)
                frames.append(frame)
        if len(frames) >= MAX_FRAMES:
            break
    return frames[:MAX_FRAMES]


def failing_tests(output: str) -> list[TestId]:
    """The tests the output reports as failed or erroring, in order, without repeats."""
    tests: list[TestId] = []

    def add(test: TestId) -> None:
        if test not in tests and len(tests) < MAX_TESTS:
            tests.append(test)

    for match in _PYTEST_NODEID.finditer(output):
        parts = (match.group("a") or match.group("b")).split("::")
        name = re.sub(r"\[.*$", "", parts[-1])
        owner = parts[-2] if len(parts) > 2 else None
        add(TestId(parts[0], name, owner))
    for match in _PYTEST_HEADER.finditer(output):
        dotted = re.sub(r"\[.*$", "", match.group("name")).split(".")
        add(TestId(None, dotted[-1], dotted[-2] if len(dotted) > 1 else None))
    for match in _UNITTEST.finditer(output):
        where = match.group("where").split(".")
        if where[-1] == match.group("name"):
            where = where[:-1]
        owner = where[-1] if len(where) > 1 else None
        path = "/".join(where[:-1]) + ".py" if len(where) > 1 else None
        add(TestId(path, match.group("name"), owner))
    # A test named in several forms is kept once, in the most precise form.
    precise = {(t.name, t.owner) for t in tests if t.path}
    return [t for t in tests if t.path or (t.name, t.owner) not in precise]


def mentioned_names(text: str) -> list[Mention]:
    """Names in a bug report that may be code, best evidence first (one entry per name)."""
    weights: dict[str, float] = {}

    def add(name: str, weight: float) -> None:
        name = name.strip(".")
        if name and weights.get(name, 0.0) < weight:
            weights[name] = weight

    for match in _BACKTICKED.finditer(text):
        inner = match.group(1)
        for call in _CALL.finditer(inner):
            add(call.group(1), 6.0)
        for dotted in _DOTTED.finditer(inner):
            add(dotted.group(1), 6.0)
        for word in _WORD.finditer(inner):
            add(word.group(1), 5.0)
    prose = _PATH.sub(" ", text)
    for call in _CALL.finditer(prose):
        add(call.group(1), 6.0)
    for dotted in _DOTTED.finditer(prose):
        name = dotted.group(1)
        if not re.fullmatch(r"(?:[a-z]\.)+[a-z]?", name):  # "e.g", "i.e."
            add(name, 4.0)
    for word in _WORD.finditer(prose):
        name = word.group(1)
        if name.lower() in _STOPWORDS:
            continue
        looks_like_code = "_" in name.strip("_") or re.search(r"[a-z][A-Z]", name) is not None
        add(name, 3.0 if looks_like_code else 1.5)
    return sorted(
        (Mention(n, w) for n, w in weights.items()), key=lambda m: (-m.weight, text.find(m.name))
    )


def mentioned_paths(text: str) -> list[str]:
    """File paths written in the bug report (``isodate/duration.py``)."""
    return list(dict.fromkeys(m.group(1) for m in _PATH.finditer(text)))
