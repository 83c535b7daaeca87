"""Find where a block of lines sits in a file, tolerating what models get wrong.

Matching runs in stages and stops at the first stage that finds anything: exact lines, then lines
compared without trailing whitespace, then lines whose indentation differs from the file's by one
uniform amount (the replacement is re-indented by the same amount). A stage that finds several
places is ambiguous; it is never resolved by guessing unless the caller has a line-number hint
(a diff hunk header), in which case the nearest place wins and a tie is still ambiguous.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

# Past this size, "nearest similar lines" is skipped: it is a hint, not worth seconds of CPU.
_NEAREST_MAX_FILE_LINES = 20_000
_NEAREST_MIN_RATIO = 0.5

MatchKind = Literal["exact", "trailing-whitespace", "indentation"]


class MatchProblem(Exception):
    """The block matched nowhere or in several places; ``detail`` explains it for the model."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True)
class Match:
    """Lines ``start:end`` of the file (0-based) are to become ``replacement``."""

    start: int
    end: int
    replacement: list[str]
    kind: MatchKind


def locate(
    file_lines: Sequence[str],
    search: Sequence[str],
    replace: Sequence[str],
    *,
    hint: int | None = None,
    subject: str = "the SEARCH text",
) -> Match:
    """The one place ``search`` occupies in ``file_lines``, or :class:`MatchProblem`.

    ``hint`` is a 0-based line index where the block is expected (from a diff hunk header);
    ``subject`` names the searched lines in problem messages.
    """
    m = len(search)
    starts = range(len(file_lines) - m + 1)
    stages: list[tuple[MatchKind, Callable[[int], list[str] | None]]] = [
        ("exact", lambda i: list(replace) if _same(file_lines, i, search) else None),
        (
            "trailing-whitespace",
            lambda i: list(replace) if _same_rstripped(file_lines, i, search) else None,
        ),
        ("indentation", lambda i: _reindented(file_lines[i : i + m], search, replace)),
    ]
    for kind, attempt in stages:
        found = [(i, r) for i in starts if (r := attempt(i)) is not None]
        if not found:
            continue
        if len(found) > 1:
            found = _nearest_to_hint(found, hint)
        if len(found) > 1:
            where = ", ".join(str(i + 1) for i, _ in found[:10])
            raise MatchProblem(
                f"{subject} matches {len(found)} places (starting at lines {where}). "
                "Include more surrounding lines so that it matches exactly one place."
            )
        start, replacement = found[0]
        return Match(start, start + m, replacement, kind)
    raise MatchProblem(_not_found_detail(file_lines, search, subject))


def _same(file_lines: Sequence[str], i: int, search: Sequence[str]) -> bool:
    return all(file_lines[i + k] == line for k, line in enumerate(search))


def _same_rstripped(file_lines: Sequence[str], i: int, search: Sequence[str]) -> bool:
    return all(file_lines[i + k].rstrip() == line.rstrip() for k, line in enumerate(search))


def _leading(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _reindented(
    window: Sequence[str], search: Sequence[str], replace: Sequence[str]
) -> list[str] | None:
    """``replace`` shifted by the one indentation change that turns ``search`` into ``window``."""
    shift: tuple[bool, str] | None = None  # (adds indentation?, the indentation added/removed)
    for have, want in zip(window, search, strict=True):
        if not want.strip():
            if have.strip():
                return None
            continue
        if have.strip() != want.strip():
            return None
        lead_have, lead_want = _leading(have), _leading(want)
        if shift is None:
            if lead_have.endswith(lead_want):
                shift = (True, lead_have[: len(lead_have) - len(lead_want)])
            elif lead_want.endswith(lead_have):
                shift = (False, lead_want[: len(lead_want) - len(lead_have)])
            else:
                return None
        adds, extra = shift
        if (lead_have != extra + lead_want) if adds else (lead_want != extra + lead_have):
            return None
    if shift is None:
        return None  # only blank lines: nothing anchors the block
    adds, extra = shift
    shifted: list[str] = []
    for line in replace:
        if not line.strip():
            shifted.append("")
        elif adds:
            shifted.append(extra + line)
        else:
            shifted.append(line[min(len(extra), len(_leading(line))) :])
    return shifted


def _nearest_to_hint(
    found: list[tuple[int, list[str]]], hint: int | None
) -> list[tuple[int, list[str]]]:
    if hint is None:
        return found
    best = min(abs(i - hint) for i, _ in found)
    return [(i, r) for i, r in found if abs(i - hint) == best]


def _not_found_detail(file_lines: Sequence[str], search: Sequence[str], subject: str) -> str:
    detail = (
        f"{subject} does not match the file; it must copy existing lines exactly "
        "(differences in indentation and trailing whitespace are tolerated)."
    )
    nearest = nearest_lines(file_lines, search)
    if nearest is None:
        return detail
    start, end = nearest
    excerpt = "\n".join(file_lines[start:end])
    return (
        f"{detail} The most similar existing text is lines {start + 1}-{end}:\n```\n{excerpt}\n```"
    )


def nearest_lines(file_lines: Sequence[str], search: Sequence[str]) -> tuple[int, int] | None:
    """The 0-based ``(start, end)`` window of the file most like ``search``, if any is close."""
    anchors = [(k, line.strip()) for k, line in enumerate(search) if line.strip()]
    if not anchors or not file_lines or len(file_lines) > _NEAREST_MAX_FILE_LINES:
        return None
    # Anchor on the most distinctive (longest) search line, then score whole windows around the
    # few file lines that resemble it: cheap, and good enough for a hint.
    offset, anchor = max(anchors, key=lambda pair: len(pair[1]))
    matcher = difflib.SequenceMatcher(autojunk=False)
    matcher.set_seq2(anchor)
    scored: list[tuple[float, int]] = []
    for index, line in enumerate(file_lines):
        matcher.set_seq1(line.strip())
        if (
            matcher.real_quick_ratio() >= _NEAREST_MIN_RATIO
            and matcher.quick_ratio() >= _NEAREST_MIN_RATIO
        ):
            scored.append((matcher.ratio(), index))
    wanted = "\n".join(line.strip() for line in search)
    best: tuple[float, int] | None = None
    for _, index in sorted(scored, reverse=True)[:5]:
        start = max(0, index - offset)
        end = min(len(file_lines), start + len(search))
        window = "\n".join(line.strip() for line in file_lines[start:end])
        ratio = difflib.SequenceMatcher(None, window, wanted, autojunk=False).ratio()
        if ratio >= _NEAREST_MIN_RATIO and (best is None or ratio > best[0]):
            best = (ratio, start)
    if best is None:
        return None
    start = best[1]
    return start, min(len(file_lines), start + len(search))
