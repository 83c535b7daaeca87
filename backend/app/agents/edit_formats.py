"""Parse the edits a model proposes: search/replace blocks and unified diffs.

Written by hand because the libraries for these formats (``unidiff``, ``whatthepatch``) parse
well-formed patches, and model output is not: hunk counts are wrong, blank context lines lose their
leading space, and paths sit in backticks above a fence. Parsing here is forgiving about layout and
strict about structure; anything it cannot read raises :class:`EditError` with a message meant to
be sent back to the model.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Literal

_SEARCH = re.compile(r"^\s*<{5,9} ?SEARCH\s*$")
_DIVIDER = re.compile(r"^\s*={5,9}\s*$")
_REPLACE = re.compile(r"^\s*>{5,9} ?REPLACE\s*$")
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+.-]*)\s*$")
_HUNK_HEADER = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
_PATH_LABEL = re.compile(r"^(?:file(?:name)?|path)\s*:\s*", re.IGNORECASE)
_DIFF_LANGS = frozenset({"diff", "patch", "udiff"})
# How far above a SEARCH marker the file path may sit (path, fence line, blank line).
_PATH_LOOKBACK = 3


class EditError(Exception):
    """An edit could not be parsed or applied; ``message`` is written for the model to act on."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class SearchReplace:
    """Replace the lines ``search`` with ``replace`` in ``path`` (both hold whole lines).

    An empty ``search`` creates ``path``. ``block`` is the 1-based position of the edit in the
    reply, used to name it in error messages.
    """

    path: str
    search: str
    replace: str
    block: int


@dataclass(frozen=True)
class DiffHunk:
    """One ``@@`` hunk: ``old`` is context plus removed lines, ``new`` is context plus added."""

    old_start: int
    old: tuple[str, ...]
    new: tuple[str, ...]


@dataclass(frozen=True)
class FileDiff:
    """The hunks of a unified diff for one file; ``kind`` says whether it is created or deleted."""

    path: str
    kind: Literal["modify", "create", "delete"]
    hunks: tuple[DiffHunk, ...]
    block: int


Edit = SearchReplace | FileDiff


def parse_edits(text: str) -> list[Edit]:
    """Every edit in a model reply, in order: search/replace blocks, then fenced diffs.

    A reply with neither format yields an empty list. A reply with a malformed block raises
    :class:`EditError`.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    edits: list[Edit] = list(_parse_search_replace(lines))
    diff_bodies = _fenced_diff_bodies(lines)
    if not diff_bodies and not edits and _looks_like_bare_diff(lines):
        diff_bodies = [lines]
    for body in diff_bodies:
        for file_diff in _parse_unified_diff(body):
            edits.append(
                FileDiff(file_diff.path, file_diff.kind, file_diff.hunks, block=len(edits) + 1)
            )
    return edits


def _parse_search_replace(lines: list[str]) -> list[SearchReplace]:
    blocks: list[SearchReplace] = []
    previous_path: str | None = None
    i = 0
    while i < len(lines):
        if not _SEARCH.match(lines[i]):
            i += 1
            continue
        number = len(blocks) + 1
        path = _path_above(lines, i) or previous_path
        if path is None:
            raise EditError(
                f"Edit block {number} has no file path: put the path on its own line "
                "directly above the <<<<<<< SEARCH marker."
            )
        divider = _find(lines, i + 1, _DIVIDER)
        end = _find(lines, divider + 1, _REPLACE) if divider is not None else None
        if divider is None or end is None:
            missing = "=======" if divider is None else ">>>>>>> REPLACE"
            raise EditError(f"Edit block {number} ({path}) has no '{missing}' line.")
        blocks.append(
            SearchReplace(
                path=path,
                search=_join(lines[i + 1 : divider]),
                replace=_join(lines[divider + 1 : end]),
                block=number,
            )
        )
        previous_path = path
        i = end + 1
    return blocks


def _path_above(lines: list[str], marker: int) -> str | None:
    """The file path written just above a SEARCH marker, skipping fence lines and blanks."""
    for j in range(marker - 1, max(-1, marker - 1 - _PATH_LOOKBACK), -1):
        line = lines[j].strip()
        if not line or _FENCE.match(line):
            continue
        if _REPLACE.match(line):
            return None  # a second block for the same file, path given once
        return _clean_path(line)
    return None


def _clean_path(raw: str) -> str | None:
    candidate = raw.strip().strip("*#").strip().strip("`").strip()
    candidate = _PATH_LABEL.sub("", candidate).strip().strip("`").rstrip(":").strip()
    if not candidate or any(ch.isspace() for ch in candidate):
        return None  # prose, not a path
    return candidate


def _find(lines: list[str], start: int, pattern: re.Pattern[str]) -> int | None:
    for j in range(start, len(lines)):
        if pattern.match(lines[j]):
            return j
    return None


def _join(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


def _fenced_diff_bodies(lines: list[str]) -> list[list[str]]:
    bodies: list[list[str]] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, lang = opening.group(1), opening.group(2).lower()
        end = i + 1
        # The closing fence is a bare fence line; diff lines always carry a prefix.
        while end < len(lines) and lines[end].strip() != fence:
            end += 1
        if lang in _DIFF_LANGS:
            bodies.append(lines[i + 1 : end])
        i = end + 1
    return bodies


def _looks_like_bare_diff(lines: list[str]) -> bool:
    return any(a.startswith("--- ") and b.startswith("+++ ") for a, b in itertools.pairwise(lines))


def _diff_path(header: str) -> str | None:
    raw = header[4:].split("\t", 1)[0].strip()
    if raw == "/dev/null":
        return None
    if raw.startswith(("a/", "b/")):
        raw = raw[2:]
    return raw


def _parse_unified_diff(lines: list[str]) -> list[FileDiff]:
    diffs: list[FileDiff] = []
    i = 0
    while i < len(lines):
        if not (
            lines[i].startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ ")
        ):
            i += 1
            continue
        old_path, new_path = _diff_path(lines[i]), _diff_path(lines[i + 1])
        label = new_path or old_path or "?"
        if old_path is None and new_path is None:
            raise EditError(f"The diff for {label} names /dev/null on both sides.")
        if old_path is not None and new_path is not None and old_path != new_path:
            raise EditError(
                f"The diff renames {old_path} to {new_path}; renames are not supported. "
                "Create the new file and delete the old one in separate diffs."
            )
        hunks, i = _parse_hunks(lines, i + 2, label)
        if not hunks:
            raise EditError(f"The diff for {label} has no @@ hunks.")
        kind: Literal["modify", "create", "delete"] = (
            "create" if old_path is None else "delete" if new_path is None else "modify"
        )
        diffs.append(FileDiff(path=label, kind=kind, hunks=tuple(hunks), block=0))
    return diffs


def _parse_hunks(lines: list[str], i: int, label: str) -> tuple[list[DiffHunk], int]:
    hunks: list[DiffHunk] = []
    while i < len(lines):
        header = _HUNK_HEADER.match(lines[i])
        if header is None:
            if lines[i].startswith(("--- ", "diff ")):
                break
            if lines[i].startswith(("+", "-")):
                raise EditError(f"The diff for {label} has a changed line outside any @@ hunk.")
            i += 1  # "index ...", "new file mode ...", prose between hunks
            continue
        old: list[str] = []
        new: list[str] = []
        i += 1
        # Counts in the header are ignored on purpose: models get them wrong. A hunk ends at
        # the next header, the next file, or a line no diff can contain.
        while i < len(lines) and not _HUNK_HEADER.match(lines[i]):
            line = lines[i]
            if line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
                break
            if line.startswith("diff "):
                break
            if line.startswith("\\"):
                pass  # "\ No newline at end of file"
            elif line.startswith("+"):
                new.append(line[1:])
            elif line.startswith("-"):
                old.append(line[1:])
            elif line.startswith(" ") or line == "":
                old.append(line[1:])
                new.append(line[1:])
            elif old and new and old[-1] == "" and new[-1] == "":
                break  # prose after a blank line: the hunk ended at the blank line
            else:
                raise EditError(
                    f"The diff for {label} has a hunk line that is neither context (' '), "
                    f"removal ('-') nor addition ('+'): {line!r}"
                )
            i += 1
        _drop_trailing_blank_context(old, new)
        hunks.append(DiffHunk(old_start=int(header.group(1)), old=tuple(old), new=tuple(new)))
    return hunks, i


def _drop_trailing_blank_context(old: list[str], new: list[str]) -> None:
    # A blank line before the closing fence is usually the model's layout, not context.
    while old and new and old[-1] == "" and new[-1] == "":
        old.pop()
        new.pop()
