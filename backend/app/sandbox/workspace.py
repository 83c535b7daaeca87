"""A private directory per job, and a clone of an untrusted repository into it.

Decisions a caller may rely on:

* **Accepted repository URLs**: ``https://`` for remote repositories; absolute local paths and
  ``file://`` URLs for local ones (unless ``allow_local=False``, which an API facing users
  should pass). Refused: ``ssh://`` and scp-style ``host:path`` (they need keys and run ssh with
  options a URL can smuggle in), ``git://`` and ``http://`` (unauthenticated, tamperable), every
  ``<transport>::`` address (``ext::`` runs arbitrary commands), anything starting with ``-``,
  credentials in the URL, whitespace and control characters, relative local paths (so no
  ``../`` tricks) and local paths that are not git repositories.
* **Git runs as an argument vector** with ``--`` before the URL, only the one protocol it needs
  allowed, no hooks, no submodules, no system or global configuration, no prompts, under the
  sandbox of :mod:`app.sandbox.runner` with a wall-clock deadline for the whole clone.
* **Size**: checked after the objects are fetched and again after checkout; a clone over the
  limit is deleted. The deadline bounds what a clone can write before the check.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from app.sandbox.runner import (
    InvalidTestCommand,
    Isolation,
    RunResult,
    detect_isolation,
    parse_test_command,
    run_sandboxed,
)

__all__ = [
    "CloneError",
    "ClonedRepository",
    "InvalidGitRef",
    "InvalidRepoURL",
    "InvalidTestCommand",
    "RunResult",
    "Workspace",
    "clone_repository",
    "detect_isolation",
    "parse_test_command",
    "run_sandboxed",
    "validate_git_ref",
    "validate_repo_url",
]

_MAX_URL_LENGTH = 2048
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")
# Stricter than git-check-ref-format on purpose: the names people actually use, nothing else.
_REF = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/+-]*$")
_GIT_OUTPUT_BYTES = 16 * 1024


class InvalidRepoURL(ValueError):
    """The repository URL is refused; the message says why."""


class InvalidGitRef(ValueError):
    """The branch, tag or commit name is refused; the message says why."""


class CloneError(RuntimeError):
    """Cloning or checking out failed, timed out or exceeded the size limit."""


@dataclass(frozen=True)
class ClonedRepository:
    path: Path
    commit: str
    """The full SHA checked out."""
    ref: str | None
    size_bytes: int


def validate_repo_url(url: str, *, allow_local: bool = True) -> str:
    """``url`` if it is an acceptable repository address (see the module docstring).

    Raises :class:`InvalidRepoURL` otherwise. Local paths must exist and be git repositories.
    """
    if not url:
        raise InvalidRepoURL("the repository URL is empty")
    if len(url) > _MAX_URL_LENGTH:
        raise InvalidRepoURL(f"the repository URL is longer than {_MAX_URL_LENGTH} characters")
    if any(ch.isspace() or unicodedata.category(ch).startswith("C") for ch in url):
        raise InvalidRepoURL("the repository URL contains whitespace or control characters")
    if url.startswith("-"):
        raise InvalidRepoURL("the repository URL starts with '-', which git reads as an option")
    if "::" in url:
        raise InvalidRepoURL(
            "'<transport>::<address>' URLs (such as ext::) are refused: they run helper programs"
        )
    scheme = _SCHEME.match(url)
    if scheme is not None:
        name = scheme.group(1).lower()
        if name == "https":
            return _validate_https(url)
        if name == "file":
            _validate_local(_file_url_path(url), allow_local)
            return url
        raise InvalidRepoURL(f"{name}:// URLs are refused; use https:// for a remote repository")
    if not url.startswith("/"):
        if ":" in url.split("/", 1)[0]:
            raise InvalidRepoURL("scp-style 'host:path' (ssh) addresses are refused; use https://")
        raise InvalidRepoURL("a local repository path must be absolute")
    _validate_local(url, allow_local)
    return url


def _validate_https(url: str) -> str:
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise InvalidRepoURL("credentials in the repository URL are refused")
    if parts.query or parts.fragment:
        raise InvalidRepoURL("the repository URL may not have a query or a fragment")
    try:
        parts.port  # noqa: B018 - parsing the port validates it
    except ValueError as exc:
        raise InvalidRepoURL(f"the repository URL has an invalid port: {exc}") from exc
    if not parts.hostname or not _HOSTNAME.match(parts.hostname):
        raise InvalidRepoURL("the repository URL has no valid host name")
    return url


def _file_url_path(url: str) -> str:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise InvalidRepoURL("file:// URLs must name a local path (file:///path/to/repo)")
    if parts.query or parts.fragment or "%" in url:
        raise InvalidRepoURL("file:// URLs may not have a query, a fragment or %-escapes")
    return parts.path


def _validate_local(path: str, allow_local: bool) -> None:
    if not allow_local:
        raise InvalidRepoURL("local repositories are not accepted here; use https://")
    if not path.startswith("/") or ".." in PurePosixPath(path).parts:
        raise InvalidRepoURL("a local repository path must be absolute, without '..'")
    where = Path(path)
    is_repo = (where / ".git").exists() or (
        (where / "HEAD").is_file() and (where / "objects").is_dir()
    )
    if not where.is_dir() or not is_repo:
        raise InvalidRepoURL(f"{path} is not a git repository")


def validate_git_ref(ref: str) -> str:
    """``ref`` if it is a plausible branch, tag or commit name; :class:`InvalidGitRef` if not."""
    if not ref or len(ref) > 255:
        raise InvalidGitRef("the git ref must be 1 to 255 characters long")
    if not _REF.match(ref):
        raise InvalidGitRef(
            "the git ref may contain only letters, digits and . _ / + - "
            "and must start with a letter, digit or _"
        )
    if ".." in ref or "//" in ref or ref.endswith(("/", ".", ".lock")) or "/." in ref:
        raise InvalidGitRef(f"{ref!r} is not a valid git ref name")
    return ref


def clone_repository(
    url: str,
    dest: Path,
    ref: str | None = None,
    *,
    timeout_s: float,
    max_size_mb: float,
    allow_local: bool = True,
    isolation: Isolation | None = None,
) -> ClonedRepository:
    """Clone ``url`` into ``dest`` (absent or empty) and check out ``ref`` (default: HEAD).

    ``ref`` is a branch, a tag or a commit SHA. Raises :class:`InvalidRepoURL` or
    :class:`InvalidGitRef` before running anything, :class:`CloneError` after; on any error
    ``dest`` is left absent (or empty, if it existed before).
    """
    url = validate_repo_url(url, allow_local=allow_local)
    if ref is not None:
        ref = validate_git_ref(ref)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise CloneError(f"{dest} exists and is not an empty directory")
    existed = dest.exists()
    dest.parent.mkdir(parents=True, exist_ok=True)
    git = _Git(
        https=url.startswith("https://"), deadline=time.monotonic() + timeout_s, isolation=isolation
    )
    try:
        clone = ["clone", "--no-checkout", "--no-recurse-submodules", "--quiet"]
        if not git.https:
            clone.append("--no-local")  # the file transport, not a copy of the source's .git
        git.run([*clone, "--", url, str(dest)], cwd=dest.parent, action="git clone")
        limit = int(max_size_mb * 1024 * 1024)
        _check_size(dest, limit)
        commit, branch = _resolve(git, dest, ref)
        if branch is not None:
            checkout = ["checkout", "--quiet", "--force", "-B", branch, commit]
        else:
            checkout = ["checkout", "--quiet", "--force", "--detach", commit]
        git.run(checkout, cwd=dest, action=f"git checkout {ref or 'HEAD'}")
        size = _check_size(dest, limit)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        if existed:
            dest.mkdir()
        raise
    return ClonedRepository(path=dest, commit=commit, ref=ref, size_bytes=size)


class _Git:
    """Runs git with a hardened configuration under one shared deadline."""

    def __init__(self, *, https: bool, deadline: float, isolation: Isolation | None) -> None:
        self.https = https
        self.deadline = deadline
        self.isolation = isolation
        protocol = "https" if https else "file"
        self.config = [
            *("-c", "protocol.allow=never"),
            *("-c", f"protocol.{protocol}.allow=always"),
            *("-c", "protocol.ext.allow=never"),
            *("-c", "core.hooksPath=/dev/null"),
            *("-c", "core.fsmonitor=false"),
            *("-c", "submodule.recurse=false"),
            *("-c", "credential.helper="),
            *("-c", "advice.detachedHead=false"),
        ]
        self.env = {
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,  # no url.*.insteadOf rewriting, no helpers
            "GIT_ALLOW_PROTOCOL": protocol,
            "GIT_TERMINAL_PROMPT": "0",
        }

    def run(self, args: list[str], *, cwd: Path, action: str, check: bool = True) -> RunResult:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise CloneError(f"{action}: the clone deadline has passed")
        result = run_sandboxed(
            ["git", *self.config, *args],
            cwd,
            timeout_s=remaining,
            max_output_bytes=_GIT_OUTPUT_BYTES,
            extra_env=self.env,
            network=self.https,
            isolation=self.isolation,
        )
        if result.timed_out:
            raise CloneError(f"{action} timed out")
        if check and result.exit_code != 0:
            raise CloneError(f"{action} failed (exit {result.exit_code}): {result.output.strip()}")
        return result


def _resolve(git: _Git, repo: Path, ref: str | None) -> tuple[str, str | None]:
    """The commit SHA for ``ref``, and the branch name to check out (None: detached)."""
    candidates = (
        [("HEAD", None)]
        if ref is None
        else [(f"refs/remotes/origin/{ref}", ref), (f"refs/tags/{ref}", None), (ref, None)]
    )
    for name, branch in candidates:
        found = git.run(
            ["rev-parse", "--verify", "--quiet", "--end-of-options", f"{name}^{{commit}}"],
            cwd=repo,
            action="git rev-parse",
            check=False,
        )
        if found.exit_code == 0:
            if ref is None:
                head = git.run(
                    ["symbolic-ref", "--quiet", "--short", "HEAD"],
                    cwd=repo,
                    action="git symbolic-ref",
                    check=False,
                )
                branch = head.output.strip() if head.exit_code == 0 else None
            return found.output.strip(), branch
    raise CloneError(
        "the repository is empty" if ref is None else f"no branch, tag or commit named {ref!r}"
    )


def _check_size(root: Path, limit: int) -> int:
    size = _tree_size(root)
    if size > limit:
        raise CloneError(
            f"the repository takes {size / 2**20:.1f} MB, over the {limit / 2**20:.1f} MB limit"
        )
    return size


def _tree_size(root: Path) -> int:
    total = 0
    for directory, _subdirs, files in os.walk(root):  # os.walk does not follow symlinks
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except OSError:
                continue
    return total


class Workspace:
    """A private temporary directory for one job, removed on exit unless ``keep``.

    ``path`` is created with mode 0o700 under ``root`` (the system temp dir by default);
    ``repo_dir`` is where the repository goes and ``home_dir`` the ``HOME`` for its commands.
    """

    def __init__(
        self, root: Path | None = None, *, keep: bool = False, prefix: str = "asa-job-"
    ) -> None:
        self.root = root
        self.keep = keep
        self.prefix = prefix
        self._path: Path | None = None

    @property
    def path(self) -> Path:
        if self._path is None:
            raise RuntimeError("the workspace is not open; use it as a context manager")
        return self._path

    @property
    def repo_dir(self) -> Path:
        return self.path / "repo"

    @property
    def home_dir(self) -> Path:
        return self.path / "home"

    def __enter__(self) -> Workspace:
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)
        self._path = Path(tempfile.mkdtemp(prefix=self.prefix, dir=self.root))
        self._path.chmod(0o700)  # mkdtemp already does; kept explicit because it matters
        self.home_dir.mkdir(mode=0o700)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self.keep:
            self.remove()

    def remove(self) -> None:
        """Delete the workspace and everything in it (a test run may have made it read-only)."""
        if self._path is not None and self._path.exists():
            shutil.rmtree(self._path, onerror=_make_writable_and_retry)
        self._path = None


def _make_writable_and_retry(function: Callable[..., Any], path: str, _exc_info: object) -> None:
    parent = os.path.dirname(path)
    os.chmod(parent, os.stat(parent).st_mode | stat.S_IRWXU)
    if os.path.isdir(path) and not os.path.islink(path):
        os.chmod(path, os.stat(path).st_mode | stat.S_IRWXU)
    function(path)
