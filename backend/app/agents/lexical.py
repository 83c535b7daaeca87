"""Lexical retrieval over definitions (BM25): how well a function's words match the bug.

A definition's words are the parts of its name (counted three times), of the names it uses
(split at ``_`` and case changes: ``tzsign`` stays one word, ``parse_tzinfo`` is two) and of its
docstring. The query is the bug report and the failure's assertion lines. It is a weak signal
by itself; localization uses it to add candidates when the strong signals (frames, the tests'
calls, names in the report) fall short, and to order what the call graph reaches. Hand-written
(a few lines of BM25) rather than a search library, which would be a dependency for one
function.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable

from app.agents.repo_context import is_test_path
from app.agents.symbols import RepoIndex, Symbol

K1 = 1.2
B = 0.75
_PARTS = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])")
_ASSERTION_LINE = re.compile(r"^(?:E\s+.*|\w*(?:Error|Exception)\b.*)$", re.MULTILINE)
_STOP_TEXT = """
the and for with that this from not are was but its has have had you your self cls none true
false return returns get set def class if else elif
"""
_STOP = frozenset(_STOP_TEXT.split())


def words(text: str) -> list[str]:
    """Lower-case stems of the words in ``text``, identifiers split into their parts."""
    out: list[str] = []
    for part in _PARTS.findall(text):
        word = _stem(part.lower())
        if len(word) >= 3 and word not in _STOP:
            out.append(word)
    return out


def _stem(word: str) -> str:
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            if len(word) > 3 and word[-1] == word[-2]:
                word = word[:-1]  # formatting -> format
            break
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        word = word[:-1]
    if word.endswith("e") and len(word) > 3:
        word = word[:-1]
    return word


def query_text(bug_report: str, failure_output: str) -> str:
    """The report and the failure's assertion and exception lines."""
    return bug_report + "\n" + "\n".join(_ASSERTION_LINE.findall(failure_output)[-40:])


def rank_lexical(index: RepoIndex, query: str) -> list[tuple[Symbol, float]]:
    """Source definitions (not nested functions) by BM25 score, normalized to the best = 1."""
    terms = Counter(words(query))
    if not terms:
        return []
    documents: list[tuple[Symbol, Counter[str]]] = []
    for module in index.modules.values():
        if is_test_path(module.path):
            continue
        for symbol in module.symbols:
            if symbol.kind == "function" and symbol.owner is not None:
                continue
            documents.append((symbol, Counter(_document_words(symbol))))
    if not documents:
        return []
    frequency: Counter[str] = Counter()
    for _, document in documents:
        frequency.update(set(document) & set(terms))
    average = sum(sum(d.values()) for _, d in documents) / len(documents) or 1.0
    count = len(documents)
    scored: list[tuple[Symbol, float]] = []
    for symbol, document in documents:
        length = sum(document.values())
        score = 0.0
        for term in terms:
            tf = document.get(term, 0)
            if not tf:
                continue
            idf = math.log(1 + (count - frequency[term] + 0.5) / (frequency[term] + 0.5))
            score += idf * tf * (K1 + 1) / (tf + K1 * (1 - B + B * length / average))
        if score > 0:
            scored.append((symbol, score))
    if not scored:
        return []
    best = max(score for _, score in scored)
    scored.sort(key=lambda item: (-item[1], item[0].path, item[0].start))
    return [(symbol, score / best) for symbol, score in scored]


def _document_words(symbol: Symbol) -> Iterable[str]:
    yield from words(symbol.name) * 3
    for name in symbol.names:
        yield from words(name)
    yield from words(symbol.doc)
