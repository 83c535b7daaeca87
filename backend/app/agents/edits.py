"""Apply the edits a model proposes to a workspace: all of them, or none.

Every edit is first applied in memory; only if all of them apply is anything written. Problems are
collected across the whole reply and raised as one :class:`EditError` whose ``message`` tells the
model which file and which block failed and why, so that one round trip can fix them all.

Paths are untrusted: absolute paths, ``..``, anything under ``.git`` and anything that resolves
(through symlinks) outside the workspace are refused before a byte is read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from app.agents.edit_formats import (
    DiffHunk,
    Edit,
    EditError,
    FileDiff,
    SearchReplace,
    parse_edits,
)
from app.agents.edit_matching import MatchProblem, locate

__all__ = [
    "ApplyResult",
    "DiffHunk",
    "Edit",
    "EditError",
    "FileDiff",
    "SearchReplace",
    "apply_edits",
    "parse_edits",
    "resolve_workspace_path",
]

_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")
_HUNK_SUBJECT = "the hunk's context and '-' lines"
_LINE_NUMBER = re.compile(r"^ *\d+\|(?: |$)")


@dataclass(frozen=True)
class ApplyResult:
    """What an applied reply did; paths are workspace-relative, in the order first touched."""

    changed: tuple[str, ...]
    created: tuple[str, ...]
    deleted: tuple[str, ...]
    notes: tuple[str, ...] = ()
    """Tolerances that were needed, e.g. a block matched only after re-indentation."""

    @property
    def files(self) -> tuple[str, ...]:
        return self.changed + self.created + self.deleted


@dataclass
class _Document:
    """One file's content while a reply is applied in memory."""

    display: str
    target: Path
    original: bytes | None
    lines: list[str] = field(default_factory=list)
    eol: str = "\n"
    trailing_newline: bool = True
    deleted: bool = False

    @property
    def present(self) -> bool:
        """The file exists as far as the edits applied so far are concerned."""
        return self.original is not None and not self.deleted

    def render(self) -> bytes:
        text = self.eol.join(self.lines)
        if self.lines and self.trailing_newline:
            text += self.eol
        return text.encode("utf-8")


def resolve_workspace_path(workspace: Path, raw: str) -> tuple[str, Path]:
    """``(normalized relative path, resolved absolute path)`` for ``raw``, or :class:`EditError`.

    Refuses empty and absolute paths, ``..`` components, ``.git`` anywhere, and paths whose
    resolution through existing symlinks leaves the workspace or lands in ``.git``.
    """
    if not raw or "\x00" in raw or "\\" in raw:
        raise EditError(f"{raw!r} is not a usable path: use a relative path with '/' separators.")
    if raw.startswith("/") or _WINDOWS_DRIVE.match(raw):
        raise EditError(f"{raw} is absolute; paths must be relative to the repository root.")
    parts = [part for part in PurePosixPath(raw).parts if part != "."]
    if ".." in parts:
        raise EditError(f"{raw} contains '..'; paths must stay inside the repository.")
    if any(part.lower() == ".git" for part in parts):
        raise EditError(f"{raw} is inside .git, which may not be edited.")
    if not parts:
        raise EditError(f"{raw!r} names the repository root, not a file.")
    root = workspace.resolve(strict=True)
    try:
        resolved = root.joinpath(*parts).resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop before Python 3.13
        raise EditError(f"{raw} cannot be resolved: {exc}.") from exc
    if not resolved.is_relative_to(root) or resolved == root:
        raise EditError(f"{raw} resolves outside the repository (through a symlink).")
    if any(part.lower() == ".git" for part in resolved.relative_to(root).parts):
        raise EditError(f"{raw} resolves into .git (through a symlink), which may not be edited.")
    if resolved.exists() and not resolved.is_file():
        raise EditError(f"{raw} exists but is not a regular file.")
    return "/".join(parts), resolved


def apply_edits(workspace: Path, edits: Sequence[Edit]) -> ApplyResult:
    """Apply ``edits`` to the files under ``workspace``, all or nothing.

    Raises :class:`EditError` (nothing written) when any edit is unsafe or does not apply, or when
    ``edits`` is empty.
    """
    if not edits:
        raise EditError(
            "The reply contains no edits. Use SEARCH/REPLACE blocks or a ```diff block."
        )
    documents: dict[Path, _Document] = {}
    problems: list[str] = []
    notes: list[str] = []
    for edit in edits:
        label = f"Edit block {edit.block} ({edit.path})"
        try:
            display, target = resolve_workspace_path(workspace, edit.path)
            if target not in documents:
                documents[target] = _load(display, target)
            document = documents[target]
            if isinstance(edit, SearchReplace):
                notes.extend(_apply_search_replace(document, edit, label))
            else:
                _apply_file_diff(document, edit, label, problems, notes)
        except EditError as exc:
            problems.append(f"{label}: {exc.message}")
    if problems:
        raise EditError(
            "\n\n".join(problems)
            + "\n\nNo edits were applied. Send the corrected reply with every edit."
        )
    return _write(list(documents.values()), notes)


def _load(display: str, target: Path) -> _Document:
    if not target.exists():
        return _Document(display=display, target=target, original=None, lines=[])
    data = target.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EditError("the file is not UTF-8 text and cannot be edited.") from exc
    eol = "\r\n" if "\r\n" in text else "\n"
    lines = text.split(eol) if text else []
    trailing = bool(lines) and lines[-1] == ""
    if trailing:
        lines.pop()
    return _Document(display, target, data, lines, eol, trailing)


def _split(text: str) -> list[str]:
    # str.splitlines would also split on form feeds and U+2028, which are ordinary characters
    # inside source lines.
    return text.removesuffix("\n").split("\n") if text else []


def _without_line_numbers(
    search: list[str], replace: list[str]
) -> tuple[list[str], list[str]] | None:
    """Search and replace without the ``  12| `` prefixes FixAgent's prompt shows code with,
    when the model copied them along (every SEARCH line has one); else None."""
    if not search or not all(_LINE_NUMBER.match(line) for line in search):
        return None
    return (
        [_LINE_NUMBER.sub("", line, count=1) for line in search],
        [_LINE_NUMBER.sub("", line, count=1) for line in replace],
    )


def _apply_search_replace(document: _Document, edit: SearchReplace, label: str) -> list[str]:
    search, replace = _split(edit.search), _split(edit.replace)
    if not search:
        if document.present and document.lines:
            raise EditError(
                "SEARCH is empty but the file already exists and is not empty; copy the lines "
                "to change into SEARCH."
            )
        document.lines, document.trailing_newline, document.deleted = replace, True, False
        return []
    if not document.present:
        raise EditError(
            "the file does not exist. To create it, leave the SEARCH section empty; to edit "
            "another file, check the path."
        )
    try:
        match = locate(document.lines, search, replace)
    except MatchProblem as problem:
        unnumbered = _without_line_numbers(search, replace)
        if unnumbered is None:
            raise EditError(problem.detail) from problem
        try:
            match = locate(document.lines, *unnumbered)
        except MatchProblem:
            raise EditError(problem.detail) from problem
        document.lines[match.start : match.end] = match.replacement
        return [f"{label}: matched once the copied line numbers were removed."]
    document.lines[match.start : match.end] = match.replacement
    return [] if match.kind == "exact" else [f"{label}: matched with {match.kind} tolerance."]


def _apply_file_diff(
    document: _Document, edit: FileDiff, label: str, problems: list[str], notes: list[str]
) -> None:
    if edit.kind == "create":
        if document.present:
            raise EditError("the diff creates this file, but it already exists.")
        document.lines = [line for hunk in edit.hunks for line in hunk.new]
        document.trailing_newline, document.deleted = True, False
        return
    if not document.present:
        raise EditError("the file does not exist; a diff that creates it uses --- /dev/null.")
    if edit.kind == "delete":
        document.lines, document.deleted = [], True
        return
    shift = 0  # lines added minus removed by earlier hunks: where later hunks now start
    for number, hunk in enumerate(edit.hunks, start=1):
        try:
            shift += _apply_hunk(document, hunk, shift, f"{label}, hunk {number}", notes)
        except MatchProblem as problem:
            problems.append(f"{label}, hunk {number}: {problem.detail}")


def _apply_hunk(
    document: _Document, hunk: DiffHunk, shift: int, label: str, notes: list[str]
) -> int:
    if not hunk.old:
        # Pure insertion (@@ -N,0 ...): the new lines go after line N.
        at = min(max(hunk.old_start + shift, 0), len(document.lines))
        document.lines[at:at] = list(hunk.new)
        return len(hunk.new)
    hint = max(hunk.old_start - 1, 0) + shift
    match = locate(document.lines, hunk.old, hunk.new, hint=hint, subject=_HUNK_SUBJECT)
    document.lines[match.start : match.end] = match.replacement
    if match.kind != "exact" or match.start != hint:
        notes.append(f"{label}: applied at line {match.start + 1} with {match.kind} match.")
    return len(match.replacement) - (match.end - match.start)


def _write(documents: list[_Document], notes: list[str]) -> ApplyResult:
    changed: list[str] = []
    created: list[str] = []
    deleted: list[str] = []
    done: list[_Document] = []
    try:
        for document in documents:
            if document.deleted:
                if document.original is None:
                    continue
                document.target.unlink()
                deleted.append(document.display)
            else:
                content = document.render()
                if content == document.original:
                    continue
                document.target.parent.mkdir(parents=True, exist_ok=True)
                _write_file(document.target, content)
                (changed if document.original is not None else created).append(document.display)
            done.append(document)
    except OSError as exc:
        _restore(done)
        raise EditError(f"Writing the edits failed and they were rolled back: {exc}") from exc
    return ApplyResult(tuple(changed), tuple(created), tuple(deleted), tuple(notes))


def _write_file(target: Path, content: bytes) -> None:
    # O_NOFOLLOW: the path was resolved and checked; refuse a symlink swapped in since then.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
    fd = os.open(target, flags, 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(content)


def _restore(documents: list[_Document]) -> None:
    for document in documents:
        try:
            if document.original is None:
                document.target.unlink(missing_ok=True)
            else:
                _write_file(document.target, document.original)
        except OSError:
            continue  # best effort: the original error is what the caller needs to see
