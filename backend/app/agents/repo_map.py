"""A repository map: the signatures of the definitions that matter most, Aider-style.

``rank_symbols`` ranks definitions the way Aider's repository map does: files are nodes, an edge
goes from a file that references a name to the files defining it, PageRank is personalized
towards the files the bug is about, and each file's rank is shared out among the definitions its
references point to. It is written here (a page of code) rather than taken from networkx, which
would be a dependency for one function. ``render_map`` prints the best-ranked signatures, with
their line numbers, grouped by file, within a token budget.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping

from app.agents.symbols import RepoIndex, Symbol
from app.agents.tokens import estimate_tokens

_GENERIC_NAME_FILES = 20  # a name defined in more files than this says nothing about relevance


def rank_symbols(
    index: RepoIndex, seeds: Mapping[str, float], focus: Iterable[str] = ()
) -> list[tuple[Symbol, float]]:
    """Every top-level definition and method with its rank, best first.

    ``seeds`` weighs the files the bug is about (personalization); ``focus`` names (mentioned in
    the report, called by failing tests) count ten times as references, as in Aider.
    """
    focus_names = set(focus)
    defining: dict[str, set[str]] = defaultdict(set)
    for path, module in index.modules.items():
        for symbol in module.symbols:
            if symbol.kind != "function" or symbol.owner is None:
                defining[symbol.name].add(path)
    edges: dict[str, dict[tuple[str, str], float]] = defaultdict(dict)  # src -> (dst, name) -> w
    for src, module in index.modules.items():
        for name, count in module.refs.items():
            targets = defining.get(name)
            if not targets or len(targets) > _GENERIC_NAME_FILES:
                continue
            weight = math.sqrt(count) / len(targets)
            if name in focus_names:
                weight *= 10
            elif name.startswith("_"):
                weight *= 0.1
            for dst in targets:
                if dst != src:
                    edges[src][(dst, name)] = weight
    nodes = list(index.modules)
    rank = _pagerank(nodes, edges, seeds)
    share: dict[tuple[str, str], float] = defaultdict(float)
    for src, out in edges.items():
        total = sum(out.values())
        for key, weight in out.items():
            share[key] += rank.get(src, 0.0) * weight / total
    ranked: list[tuple[Symbol, float]] = []
    for path, module in index.modules.items():
        for symbol in module.symbols:
            if symbol.kind == "function" and symbol.owner is not None:
                continue  # nested functions are shown with their parent
            score = share.get((path, symbol.name), 0.0) + rank.get(path, 0.0) * 1e-3
            if symbol.name in focus_names:
                score *= 10
            ranked.append((symbol, score))
    ranked.sort(key=lambda item: (-item[1], item[0].path, item[0].start))
    return ranked


def _pagerank(
    nodes: list[str],
    edges: Mapping[str, Mapping[tuple[str, str], float]],
    seeds: Mapping[str, float],
    damping: float = 0.85,
    iterations: int = 40,
) -> dict[str, float]:
    if not nodes:
        return {}
    known = {s: w for s, w in seeds.items() if s in set(nodes) and w > 0}
    total_seed = sum(known.values())
    personal = (
        {n: known.get(n, 0.0) / total_seed for n in nodes}
        if total_seed
        else dict.fromkeys(nodes, 1 / len(nodes))
    )
    out_weight = {src: sum(out.values()) for src, out in edges.items()}
    rank = dict(personal)
    for _ in range(iterations):
        nxt = {n: (1 - damping) * personal[n] for n in nodes}
        dangling = sum(rank[n] for n in nodes if not out_weight.get(n))
        for n in nodes:
            nxt[n] += damping * dangling * personal[n]
        for src, out in edges.items():
            mass = damping * rank.get(src, 0.0) / out_weight[src]
            for (dst, _name), weight in out.items():
                nxt[dst] += mass * weight
        rank = nxt
    return rank


def render_map(
    ranked: list[tuple[Symbol, float]], budget_tokens: int, skip: Iterable[Symbol] = ()
) -> tuple[str, list[str]]:
    """Signatures of the best-ranked definitions, grouped by file, within ``budget_tokens``;
    and the files whose definitions did not fit."""
    skipped = set(skip)
    chosen: list[Symbol] = []
    file_order: dict[str, int] = {}
    used = 0
    for symbol, _score in ranked:
        if symbol in skipped:
            continue
        cost = estimate_tokens(_map_line(symbol)) + 1
        if symbol.path not in file_order:
            cost += estimate_tokens(symbol.path) + 2
        if used + cost > budget_tokens:
            continue
        used += cost
        chosen.append(symbol)
        file_order.setdefault(symbol.path, len(file_order))
    by_file: dict[str, list[Symbol]] = defaultdict(list)
    for symbol in chosen:
        by_file[symbol.path].append(symbol)
    blocks = []
    for path in sorted(by_file, key=file_order.__getitem__):
        lines = [_map_line(s) for s in sorted(by_file[path], key=lambda s: s.start)]
        blocks.append(f"{path}:\n" + "\n".join(lines))
    left_out = sorted({s.path for s, _ in ranked if s.path not in file_order and s not in skipped})
    return "\n".join(blocks), left_out


def _map_line(symbol: Symbol) -> str:
    indent = "    " * symbol.qualname.count(".")
    return f"{symbol.start:>5}| {indent}{symbol.signature}"
