"""The repository as symbols: every Python function, method and class with its line range, what
it calls and reads, and its docstring; parsed with :mod:`ast` in one pass per file.

``build_index`` is bounded (``MAX_PARSED_FILES`` files, ``MAX_FILE_BYTES`` each,
``MAX_TOTAL_BYTES`` in all); what is over a bound stays listed but unparsed, and localization
falls back to text search for it.
"""

from __future__ import annotations

import ast
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from app.agents.repo_context import is_test_path, list_files

MAX_PARSED_FILES = 3000
MAX_FILE_BYTES = 400_000
MAX_TOTAL_BYTES = 8_000_000
MAX_SIGNATURE_CHARS = 160
MAX_DOC_CHARS = 600

SymbolKind = Literal["function", "method", "class"]

_OPERATOR_DUNDERS: dict[type[ast.AST], tuple[str, ...]] = {
    ast.Add: ("__add__", "__radd__"),
    ast.Sub: ("__sub__", "__rsub__"),
    ast.Mult: ("__mul__", "__rmul__"),
    ast.Div: ("__truediv__", "__rtruediv__"),
    ast.FloorDiv: ("__floordiv__", "__rfloordiv__"),
    ast.Mod: ("__mod__", "__rmod__"),
    ast.Pow: ("__pow__", "__rpow__"),
    ast.Eq: ("__eq__",),
    ast.NotEq: ("__ne__", "__eq__"),
    ast.Lt: ("__lt__",),
    ast.LtE: ("__le__",),
    ast.Gt: ("__gt__",),
    ast.GtE: ("__ge__",),
    ast.In: ("__contains__",),
    ast.NotIn: ("__contains__",),
    ast.USub: ("__neg__",),
    ast.Invert: ("__invert__",),
}


@dataclass(frozen=True, slots=True)
class Symbol:
    """A definition: ``start`` includes its decorators, ``end`` is its last line (1-based)."""

    path: str
    qualname: str
    kind: SymbolKind
    start: int
    end: int
    signature: str
    calls: frozenset[str] = frozenset()
    """Names it calls, and the special methods its operators call (``+`` calls ``__add__``)."""
    names: frozenset[str] = frozenset()
    """Every name and attribute it reads."""
    doc: str = ""
    """The start of its docstring."""

    @property
    def name(self) -> str:
        return self.qualname.rsplit(".", 1)[-1]

    @property
    def owner(self) -> str | None:
        """The enclosing class or function's qualified name, if any."""
        return self.qualname.rsplit(".", 1)[0] if "." in self.qualname else None

    @property
    def label(self) -> str:
        return f"{self.path}:{self.start}-{self.end} {self.qualname}"


@dataclass
class Module:
    path: str
    lines: list[str]
    symbols: list[Symbol]
    refs: Counter[str] = field(default_factory=Counter)


class RepoIndex:
    """The parsed repository. Read-only once built."""

    def __init__(
        self, repo: Path, files: list[str], modules: dict[str, Module], unparsed: list[str]
    ) -> None:
        self.repo = repo
        self.files = files
        self.modules = modules
        self.unparsed = unparsed
        self.file_set = frozenset(files)
        self.by_name: dict[str, list[Symbol]] = defaultdict(list)
        for module in modules.values():
            for symbol in module.symbols:
                self.by_name[symbol.name].append(symbol)
        self._text_cache: dict[str, list[str] | None] = {}

    def lines(self, path: str) -> list[str] | None:
        """A file's lines (without line ends); None if it is not a readable listed file."""
        module = self.modules.get(path)
        if module is not None:
            return module.lines
        if path not in self._text_cache:
            known = path in self.file_set
            self._text_cache[path] = _read_lines(self.repo / path) if known else None
        return self._text_cache[path]

    def enclosing(self, path: str, line: int) -> Symbol | None:
        """The innermost function or class whose lines hold ``line``."""
        module = self.modules.get(path)
        if module is None:
            return None
        best: Symbol | None = None
        for symbol in module.symbols:
            if symbol.start <= line <= symbol.end and (
                best is None or symbol.end - symbol.start <= best.end - best.start
            ):
                best = symbol
        return best

    def definitions(self, name: str) -> list[Symbol]:
        """Every definition of ``name``; ``a.b.C.m`` matches qualified names ending in it."""
        parts = name.split(".")
        candidates = self.by_name.get(parts[-1], [])
        if len(parts) == 1:
            return list(candidates)
        for keep in range(len(parts), 0, -1):  # the longest suffix that matches anything
            tail = ".".join(parts[-keep:])
            found = [s for s in candidates if _dotted(s).endswith(tail)]
            if found:
                return found
        return []

    def constructor(self, symbol: Symbol) -> Symbol | None:
        """A class's own ``__init__``; None for anything else."""
        if symbol.kind != "class":
            return None
        wanted = f"{symbol.qualname}.__init__"
        return next(
            (
                s
                for s in self.by_name.get("__init__", [])
                if s.path == symbol.path and s.qualname == wanted
            ),
            None,
        )

    def callees(self, symbol: Symbol) -> list[Symbol]:
        """Definitions ``symbol`` calls, same file first (a class called: with its
        ``__init__``); names defined too often are skipped."""
        found: list[Symbol] = []
        for name in sorted(symbol.calls):
            targets = [s for s in self.by_name.get(name, []) if s != symbol]
            if name.startswith("__") and name.endswith("__"):
                continue  # an operator's method: too ambiguous without types
            if not targets or len({t.path for t in targets}) > 3:
                continue
            targets.sort(key=lambda s: (s.path != symbol.path, s.path, s.start))
            for target in targets[:2]:
                found.append(target)
                init = self.constructor(target)
                if init is not None and init != symbol:
                    found.append(init)
        return found

    def callers(self, symbol: Symbol, limit: int = 8) -> list[Symbol]:
        """Functions that call ``symbol`` by name, sources before tests."""
        found = [
            s
            for module in self.modules.values()
            for s in module.symbols
            if symbol.name in s.calls and s != symbol and s.kind != "class"
        ]
        found.sort(key=lambda s: (is_test_path(s.path), s.path != symbol.path, s.path, s.start))
        return found[:limit]


def _dotted(symbol: Symbol) -> str:
    module = symbol.path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    return f"{module}.{symbol.qualname}"


def _read_lines(path: Path) -> list[str] | None:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    if b"\x00" in data[:8000]:
        return None  # binary
    return data.decode("utf-8", errors="replace").splitlines()


ModuleCache = dict[str, tuple[tuple[int, int], Module | None]]
"""Parsed modules by path, with the (mtime, size) they were parsed at: a retry re-parses only
the files that changed since (those the previous attempt's edit touched)."""


def build_index(
    repo: Path, files: list[str] | None = None, cache: ModuleCache | None = None
) -> RepoIndex:
    """Parse the repository's Python files (bounded; see the module docstring)."""
    files = list_files(repo) if files is None else files
    modules: dict[str, Module] = {}
    unparsed: list[str] = []
    total = 0
    for rel in files:
        if not rel.endswith(".py"):
            continue
        path = repo / rel
        try:
            stat = path.stat()
        except OSError:
            continue
        size = stat.st_size
        if (
            len(modules) >= MAX_PARSED_FILES
            or size > MAX_FILE_BYTES
            or total + size > (MAX_TOTAL_BYTES)
        ):
            unparsed.append(rel)
            continue
        total += size
        key = (stat.st_mtime_ns, size)
        cached = cache.get(rel) if cache is not None else None
        if cached is not None and cached[0] == key:
            module = cached[1]
        else:
            module = parse_module(rel, path.read_bytes().decode("utf-8", errors="replace"))
            if cache is not None:
                cache[rel] = (key, module)
        if module is None:
            unparsed.append(rel)
        else:
            modules[rel] = module
    return RepoIndex(repo, files, modules, unparsed)


def parse_module(rel: str, source: str) -> Module | None:
    """A module's symbols and references; None when it does not parse."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old code
            tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    return Module(rel, source.splitlines(), *_collect(rel, tree))


_Def = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
_NESTING = ast.If | ast.Try | ast.With | ast.For | ast.While


@dataclass
class _Open:
    """A definition being collected: what its body (and what it nests) calls and reads."""

    node: _Def
    qualname: str
    kind: SymbolKind
    parent: int | None
    calls: set[str] = field(default_factory=set)
    names: set[str] = field(default_factory=set)


def _collect(path: str, tree: ast.Module) -> tuple[list[Symbol], Counter[str]]:
    """One pass over the tree: every definition with the names it calls and reads (its nested
    definitions' included), and the module's references."""
    opened: list[_Open] = []
    refs: Counter[str] = Counter()
    # (node, innermost open definition, qualified-name prefix, directly in a class body)
    stack: list[tuple[ast.AST, int | None, str, bool]] = [(tree, None, "", False)]
    while stack:
        node, owner, prefix, in_class = stack.pop()
        if isinstance(node, _Def):
            kind: SymbolKind = (
                "class"
                if isinstance(node, ast.ClassDef)
                else ("method" if in_class else "function")
            )
            opened.append(_Open(node, prefix + node.name, kind, owner))
            here = len(opened) - 1
            stack.extend((d, owner, prefix, False) for d in node.decorator_list)
            in_body = isinstance(node, ast.ClassDef)
            stack.extend((b, here, f"{prefix}{node.name}.", in_body) for b in node.body)
            continue
        if owner is not None:
            current = opened[owner]
            if isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Name):
                    current.calls.add(func.id)
                elif isinstance(func, ast.Attribute):
                    current.calls.add(func.attr)
            elif isinstance(node, ast.BinOp | ast.UnaryOp | ast.AugAssign):
                current.calls.update(_OPERATOR_DUNDERS.get(type(node.op), ()))
            elif isinstance(node, ast.Compare):
                for op in node.ops:
                    current.calls.update(_OPERATOR_DUNDERS.get(type(op), ()))
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load):
                refs[node.id] += 1
                if owner is not None:
                    opened[owner].names.add(node.id)
        elif isinstance(node, ast.Attribute):
            refs[node.attr] += 1
            if owner is not None:
                opened[owner].names.add(node.attr)
        keep_class = in_class and isinstance(node, _NESTING)  # defs under `if` in a class body
        for name in node._fields:  # ast.iter_child_nodes, without a generator per node
            value = getattr(node, name, None)
            if isinstance(value, ast.AST):
                stack.append((value, owner, prefix, keep_class))
            elif isinstance(value, list):
                stack.extend(
                    (v, owner, prefix, keep_class) for v in value if isinstance(v, ast.AST)
                )
    for item in reversed(opened):  # children were opened after their parents
        if item.parent is not None:
            opened[item.parent].calls |= item.calls
            opened[item.parent].names |= item.names
    symbols = [
        Symbol(
            path,
            item.qualname,
            item.kind,
            min([item.node.lineno, *(d.lineno for d in item.node.decorator_list)]),
            item.node.end_lineno or item.node.lineno,
            _signature(item.node),
            frozenset(item.calls),
            frozenset(item.names | item.calls),
            (ast.get_docstring(item.node, clean=False) or "")[:MAX_DOC_CHARS],
        )
        for item in opened
    ]
    symbols.sort(key=lambda s: (s.start, -s.end))
    return symbols, refs


def _signature(node: _Def) -> str:
    if isinstance(node, ast.ClassDef):
        bases = [ast.unparse(b) for b in node.bases] + [ast.unparse(k) for k in node.keywords]
        text = f"class {node.name}({', '.join(bases)})" if bases else f"class {node.name}"
    else:
        prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
        text = f"{prefix} {node.name}({ast.unparse(node.args)})"
        if node.returns is not None:
            text += f" -> {ast.unparse(node.returns)}"
    text = " ".join(text.split())
    return text if len(text) <= MAX_SIGNATURE_CHARS else text[: MAX_SIGNATURE_CHARS - 3] + "..."
