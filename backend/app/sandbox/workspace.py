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
* **Addresses** (``allow_private_hosts=False``, what an API facing users passes for anyone but
  an administrator): the host may not be, or resolve to, a loopback, private, link-local,
  multicast, reserved, unspecified or shared (CGNAT) address, nor an IPv6 address embedding one
  (IPv4-mapped, NAT64, 6to4); numeric hosts must be written in dotted-decimal form. At submission
  only the URL itself is checked (no DNS); at clone time every address the name resolves to is
  checked, and git is pinned to the one checked (``http.curloptResolve``), so DNS cannot answer
  differently between the check and the connection; HTTP redirects are not followed.
* **Stalls**: before git runs we connect to the pinned address and complete a TLS handshake
  within ``connect_timeout_s``; git then aborts a transfer slower than 1 KiB/s for 30 s. A
  server that passes our handshake and then stalls git's own is bounded by the clone deadline.
* **Errors**: with ``report_git_output=False`` (anyone but an administrator) every failure to
  fetch — unknown host, refused or timed-out connection, TLS error, no repository there, a
  timeout — is one and the same message of ours, so the clone is no port-scan oracle; git's own
  text is reported only with ``report_git_output=True``.
* **Size**: checked after the objects are fetched (the pack on disk), then before the checkout
  from the sizes of the blobs it would write (``git ls-tree -l``: a blob at 25 paths counts 25
  times), and again after checkout; a clone over the limit is deleted, never checked out.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import shutil
import socket
import ssl
import stat
import tempfile
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any
from urllib.parse import SplitResult, urlsplit

from app.sandbox.runner import (
    Cancellation,
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
    "address_refusal",
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
_HTTPS_PORT = 443
CONNECT_TIMEOUT_S = 10.0
_MAX_ADDRESSES_TRIED = 4
_LOW_SPEED_BYTES_PER_S = 1024
_LOW_SPEED_SECONDS = 30
# The one answer a non-administrator gets for any failure to fetch (see the module docstring).
FETCH_FAILED = (
    "could not clone the repository: it could not be fetched from that address (the host did "
    "not answer, refused or broke the connection, or has no git repository there)"
)
_SHARED_ADDRESS_SPACE = IPv4Network("100.64.0.0/10")  # RFC 6598, carrier-grade NAT
_NAT64 = IPv6Network("64:ff9b::/96")  # RFC 6052: the IPv4 address is the last 32 bits
_NAT64_LOCAL = IPv6Network("64:ff9b:1::/48")  # RFC 8215, local use
# Special-purpose blocks (IANA registries) that Python 3.11's ipaddress does not call private.
_SPECIAL_PURPOSE: tuple[IPv4Network | IPv6Network, ...] = (
    IPv4Network("192.0.0.0/24"),  # IETF protocol assignments
    IPv4Network("192.88.99.0/24"),  # deprecated 6to4 relay anycast
    IPv6Network("3fff::/20"),  # documentation (RFC 9637)
    IPv6Network("5f00::/16"),  # SRv6 SIDs (RFC 9602)
)
_IPV6_HOST = re.compile(r"^https://\[[0-9A-Fa-f:.]*\]", re.IGNORECASE)
_NUMERIC_LABEL = re.compile(r"^(?:[0-9]+|0[xX][0-9A-Fa-f]*)$")
Address = IPv4Address | IPv6Address


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


def validate_repo_url(
    url: str, *, allow_local: bool = True, allow_private_hosts: bool = False
) -> str:
    """``url`` if it is an acceptable repository address (see the module docstring).

    Raises :class:`InvalidRepoURL` otherwise. Local paths must exist and be git repositories.
    Without ``allow_private_hosts``, an https host that is a non-public address, or a name that
    is local by definition (``localhost``), is refused; no DNS is asked here.
    """
    if not url:
        raise InvalidRepoURL("the repository URL is empty")
    if len(url) > _MAX_URL_LENGTH:
        raise InvalidRepoURL(f"the repository URL is longer than {_MAX_URL_LENGTH} characters")
    if any(ch.isspace() or unicodedata.category(ch).startswith("C") for ch in url):
        raise InvalidRepoURL("the repository URL contains whitespace or control characters")
    if url.startswith("-"):
        raise InvalidRepoURL("the repository URL starts with '-', which git reads as an option")
    if "::" in _IPV6_HOST.sub("", url, count=1):  # an https://[IPv6]/ host may hold "::"
        raise InvalidRepoURL(
            "'<transport>::<address>' URLs (such as ext::) are refused: they run helper programs"
        )
    scheme = _SCHEME.match(url)
    if scheme is not None:
        name = scheme.group(1).lower()
        if name == "https":
            return _validate_https(url, allow_private_hosts)
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


def _validate_https(url: str, allow_private_hosts: bool) -> str:
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. brackets around something that is no IPv6 address
        raise InvalidRepoURL(f"the repository URL cannot be parsed: {exc}") from None
    if "@" in parts.netloc:
        raise InvalidRepoURL("credentials in the repository URL are refused")
    if parts.query or parts.fragment:
        raise InvalidRepoURL("the repository URL may not have a query or a fragment")
    try:
        parts.port  # noqa: B018 - parsing the port validates it
    except ValueError as exc:
        raise InvalidRepoURL(f"the repository URL has an invalid port: {exc}") from exc
    host = _url_host(parts)
    literal = host_address(host, strict=not allow_private_hosts)
    if not allow_private_hosts:
        if literal is not None:
            _refuse_non_public(host, [literal])
        elif host.lower() == "localhost" or host.lower().endswith(".localhost"):
            raise InvalidRepoURL(f"{host} is this machine (a loopback address): refused")
    return url


def _url_host(parts: SplitResult) -> str:
    """The host of an https URL: a DNS name, an IPv4 address or a bracketed IPv6 address."""
    host = parts.hostname or ""
    if parts.netloc.split("@")[-1].startswith("["):  # an IPv6 literal, brackets removed
        try:
            IPv6Address(host)
        except ValueError:
            raise InvalidRepoURL("the repository URL has an invalid IPv6 address") from None
        if "%" in host:
            raise InvalidRepoURL("an IPv6 zone (%) in the repository URL is refused")
        return host
    if not host or not _HOSTNAME.match(host):
        raise InvalidRepoURL("the repository URL has no valid host name")
    return host


def host_address(host: str, *, strict: bool = True) -> Address | None:
    """The address ``host`` denotes by itself (no DNS), or None for a name to resolve.

    A host whose last label is a number is an IPv4 address, as URL parsers (and curl) read it:
    ``0x7f.1`` and ``2130706433`` are both 127.0.0.1. ``strict`` refuses every form but
    dotted decimal, so that what we check is plainly what git connects to.
    """
    if ":" in host:
        return IPv6Address(host)
    if not _NUMERIC_LABEL.match(host.rsplit(".", 1)[-1]):
        return None
    try:
        canonical = IPv4Address(host)
    except ValueError:
        canonical = None
    if canonical is not None:
        return canonical
    if strict:
        raise InvalidRepoURL(
            f"{host} is a numeric host not in dotted-decimal form; write the address as a.b.c.d"
        )
    try:
        return IPv4Address(socket.inet_aton(host))
    except OSError:
        raise InvalidRepoURL(f"{host} is not a valid IPv4 address") from None


def address_refusal(address: Address) -> str | None:
    """Why a clone for a non-administrator may not connect to ``address``; None if it may.

    Refused: loopback, private, link-local, multicast, reserved, unspecified, shared (CGNAT)
    and every other special-purpose block that is not globally reachable, and IPv6 addresses
    that embed such an IPv4 address (IPv4-mapped, NAT64, 6to4) or tunnel (Teredo).
    """
    if isinstance(address, IPv6Address):
        if address.scope_id:
            return "scoped link-local"
        embedded = address.ipv4_mapped
        if embedded is None and address in _NAT64:
            embedded = IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is None:
            embedded = address.sixtofour
        if embedded is not None:
            reason = address_refusal(embedded)
            return None if reason is None else f"{reason} (inside an IPv6 address)"
        if address.teredo is not None:
            return "Teredo tunnel"
        if address in _NAT64_LOCAL:
            return "local-use NAT64"
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if isinstance(address, IPv4Address) and address in _SHARED_ADDRESS_SPACE:
        return "shared (carrier-grade NAT)"
    if address.is_private or any(address in block for block in _SPECIAL_PURPOSE):
        return "private or special-purpose"
    if address.is_reserved:
        return "reserved"
    if isinstance(address, IPv6Address) and address.is_site_local:
        return "site-local"
    if not address.is_global:
        return "not globally reachable"
    return None


def _refuse_non_public(host: str, addresses: list[Address]) -> None:
    for address in addresses:
        reason = address_refusal(address)
        if reason is not None:
            where = host if host == str(address) else f"{host} resolves to {address}, which"
            raise InvalidRepoURL(f"{where} is a {reason} address: refused")


def resolve_host(host: str, port: int, *, allow_private_hosts: bool) -> list[Address]:
    """Every address ``host`` has (itself, for an address), each checked unless
    ``allow_private_hosts``: one non-public address refuses the whole host.

    ``OSError`` (``socket.gaierror``) when the name does not resolve.
    """
    literal = host_address(host, strict=not allow_private_hosts)
    if literal is not None:
        addresses = [literal]
    else:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        addresses = []
        for _family, _type, _proto, _name, sockaddr in found:
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if isinstance(address, IPv6Address) and len(sockaddr) == 4 and sockaddr[3]:
                address = IPv6Address(f"{address}%{sockaddr[3]}")
            if address not in addresses:
                addresses.append(address)
    if not allow_private_hosts:
        _refuse_non_public(host, addresses)
    return addresses


@dataclass(frozen=True)
class _Target:
    """The https server a clone will talk to: its name, port, and the one address checked."""

    host: str
    port: int
    address: Address
    literal: bool

    @property
    def curl_resolve(self) -> str:
        """``HOST:PORT:ADDRESS`` for ``http.curloptResolve`` (IPv6 in brackets)."""
        address = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{self.host}:{self.port}:{address}"


def _reach(
    url: str, *, allow_private_hosts: bool, report: bool, deadline: float, connect_timeout: float
) -> _Target:
    """Resolve and check the URL's host, then find an address that completes a TLS handshake
    in time: the address git is pinned to. ``CloneError`` (ours, coarse unless ``report``)
    when none does."""
    parts = urlsplit(url)
    host = _url_host(parts)
    port = parts.port or _HTTPS_PORT
    try:
        addresses = resolve_host(host, port, allow_private_hosts=allow_private_hosts)
    except OSError as exc:
        raise CloneError(
            f"could not clone: {host} does not resolve ({exc})" if report else FETCH_FAILED
        ) from None
    literal = host_address(host, strict=False) is not None
    failures: list[str] = []
    for address in addresses[:_MAX_ADDRESSES_TRIED]:
        timeout = min(connect_timeout, deadline - time.monotonic())
        if timeout <= 0:
            failures.append("the clone deadline passed")
            break
        failure = _handshake(None if literal else host, port, address, timeout)
        if failure is None:
            return _Target(host, port, address, literal=literal)
        failures.append(f"{address}: {failure}")
    if not report:
        raise CloneError(FETCH_FAILED)
    raise CloneError(f"could not clone: no answer from {host}:{port} ({'; '.join(failures)})")


def _handshake(sni: str | None, port: int, address: Address, timeout: float) -> str | None:
    """Connect and complete a TLS handshake within ``timeout``: None, or what went wrong.

    Only that the server answers is checked here; the certificate is git's to verify.
    """
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # liveness only: git verifies the certificate
    started = time.monotonic()
    try:
        with socket.socket(family, socket.SOCK_STREAM) as raw:
            raw.settimeout(timeout)
            raw.connect((str(address), port))
            raw.settimeout(max(0.001, timeout - (time.monotonic() - started)))
            with context.wrap_socket(raw, server_hostname=sni):
                return None
    except TimeoutError:
        return f"timed out waiting for a TLS answer ({timeout:.1f} s)"
    except ConnectionRefusedError:
        return "connection refused"
    except ssl.SSLError as exc:
        return f"TLS handshake failed ({exc.reason or exc})"
    except OSError as exc:
        return f"connection failed ({exc.strerror or exc})"


def _local_source(url: str) -> tuple[Path, ...]:
    """The local repository a (validated) URL names, if it names one."""
    if url.startswith("/"):
        return (Path(url),)
    if url.lower().startswith("file://"):
        return (Path(_file_url_path(url)),)
    return ()


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
    allow_private_hosts: bool = False,
    report_git_output: bool = False,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    isolation: Isolation | None = None,
    cancel: Cancellation | None = None,
) -> ClonedRepository:
    """Clone ``url`` into ``dest`` (absent or empty) and check out ``ref`` (default: HEAD).

    ``ref`` is a branch, a tag or a commit SHA. Raises :class:`InvalidRepoURL` or
    :class:`InvalidGitRef` before running anything (a host resolving to a refused address
    included), :class:`CloneError` after; on any error ``dest`` is left absent (or empty, if it
    existed before). ``allow_private_hosts`` and ``report_git_output`` are for administrators'
    tasks (see the module docstring). Setting ``cancel`` kills the git command running and fails
    the clone.
    """
    url = validate_repo_url(url, allow_local=allow_local, allow_private_hosts=allow_private_hosts)
    if ref is not None:
        ref = validate_git_ref(ref)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise CloneError(f"{dest} exists and is not an empty directory")
    deadline = time.monotonic() + timeout_s
    target = None
    if url.startswith("https://"):
        target = _reach(
            url,
            allow_private_hosts=allow_private_hosts,
            report=report_git_output,
            deadline=deadline,
            connect_timeout=connect_timeout_s,
        )
    existed = dest.exists()
    dest.parent.mkdir(parents=True, exist_ok=True)
    git = _Git(
        https=target is not None,
        deadline=deadline,
        isolation=isolation,
        target=target,
        follow_redirects=allow_private_hosts,
        report=report_git_output,
    )
    git.read_only, git.cancel = _local_source(url), cancel
    try:
        clone = ["clone", "--no-checkout", "--no-recurse-submodules", "--quiet"]
        if not git.https:
            clone.append("--no-local")  # the file transport, not a copy of the source's .git
        git.run([*clone, "--", url, str(dest)], cwd=dest.parent, action="git clone")
        limit = int(max_size_mb * 1024 * 1024)
        fetched = _check_size(dest, limit)
        commit, branch = _resolve(git, dest, ref)
        _check_checkout_size(git, dest, commit, fetched, limit)
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

    read_only: tuple[Path, ...] = ()
    """A local repository cloned from: the only host path the sandbox sees besides the clone."""
    cancel: Cancellation | None = None

    def __init__(
        self,
        *,
        https: bool,
        deadline: float,
        isolation: Isolation | None,
        target: _Target | None = None,
        follow_redirects: bool = False,
        report: bool = True,
    ) -> None:
        self.https = https
        self.deadline = deadline
        self.isolation = isolation
        self.report = report
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
        if https:
            self.config += [
                *("-c", f"http.lowSpeedLimit={_LOW_SPEED_BYTES_PER_S}"),
                *("-c", f"http.lowSpeedTime={_LOW_SPEED_SECONDS}"),
            ]
            if not follow_redirects:  # a redirect would go to a host nobody checked
                self.config += ["-c", "http.followRedirects=false"]
        if target is not None and not target.literal:
            self.config += ["-c", f"http.curloptResolve={target.curl_resolve}"]
        self.env = {
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,  # no url.*.insteadOf rewriting, no helpers
            "GIT_ALLOW_PROTOCOL": protocol,
            "GIT_TERMINAL_PROMPT": "0",
        }

    def run(
        self,
        args: list[str],
        *,
        cwd: Path,
        action: str,
        check: bool = True,
        shell_filter: str | None = None,
    ) -> RunResult:
        """Run ``git <config> <args>``; with ``shell_filter``, git's output is piped into that
        shell command instead (``sh -c '{ git "$@" || echo FAILED; } | <filter>'``)."""
        remaining = self.deadline - time.monotonic()
        fetching = action == "git clone" and self.https
        if remaining <= 0:
            raise CloneError(self._failure(fetching, f"{action}: the clone deadline has passed"))
        argv = ["git", *self.config, *args]
        if shell_filter is not None:
            script = f'{{ git "$@" || echo FAILED; }} | {shell_filter}'
            argv = ["sh", "-c", script, "sh", *self.config, *args]
        result = run_sandboxed(
            argv,
            cwd,
            timeout_s=remaining,
            max_output_bytes=_GIT_OUTPUT_BYTES,
            extra_env=self.env,
            network=self.https,
            isolation=self.isolation,
            read_only=self.read_only,
            cancel=self.cancel,
        )
        if result.cancelled:
            raise CloneError(f"{action} was cancelled")
        if result.timed_out:
            raise CloneError(self._failure(fetching, f"{action} timed out"))
        if check and result.exit_code != 0:
            detail = f"{action} failed (exit {result.exit_code})"
            if self.report:
                detail += f": {result.output.strip()}"
            raise CloneError(self._failure(fetching, detail))
        return result

    def _failure(self, fetching: bool, detail: str) -> str:
        """Our reason for a failed step: the same one for every failure to fetch over the
        network unless git's own text may be reported."""
        return FETCH_FAILED if fetching and not self.report else detail


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


# Sums the sizes of the blobs ``git ls-tree -r -l`` lists (a submodule's size is "-"); exits 1
# when git failed. Output is one number, however many files the tree has.
_SUM_BLOBS = (
    'awk \'$0 == "FAILED" { failed = 1 } $2 == "blob" { total += $4 } '
    'END { if (failed) exit 1; printf "%.0f\\n", total }\''
)


def _check_checkout_size(git: _Git, repo: Path, commit: str, fetched: int, limit: int) -> None:
    """Refuse, before anything is checked out, a checkout that would take the clone over
    ``limit``: what is on disk (``fetched``) plus every blob the tree would write."""
    listed = git.run(
        ["ls-tree", "-r", "-l", "--full-tree", "--end-of-options", commit],
        cwd=repo,
        action="git ls-tree",
        shell_filter=_SUM_BLOBS,
    )
    lines = listed.output.split()
    if not lines or not lines[-1].isdigit():
        raise CloneError("could not measure the checkout's size")
    total = fetched + int(lines[-1])
    if total > limit:
        raise CloneError(
            f"the repository would take {total / 2**20:.1f} MB once checked out, over the "
            f"{limit / 2**20:.1f} MB limit"
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
    While open, the workspace holds an exclusive ``flock`` on its directory: the kernel releases
    it when the process dies however it dies, so :meth:`reap_stale` can tell a workspace whose
    service was killed from one in use by a live process (this one or another). Only a directory
    made this way (it holds :attr:`MARKER`) is ever reaped; a kept workspace is marked as such
    and never reaped.
    """

    STAGING_PREFIX = ".asa-new-"
    MARKER = ".asa-workspace"
    KEPT_MARKER = ".asa-kept"

    def __init__(
        self, root: Path | None = None, *, keep: bool = False, prefix: str = "asa-job-"
    ) -> None:
        self.root = root
        self.keep = keep
        self.prefix = prefix
        self._path: Path | None = None
        self._lock: int | None = None

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
        # Locked under a name the reaper passes over, then renamed: never seen unlocked.
        staging = Path(tempfile.mkdtemp(prefix=self.STAGING_PREFIX, dir=self.root))
        self._lock = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        (staging / self.MARKER).touch()
        path = staging.with_name(self.prefix + staging.name.removeprefix(self.STAGING_PREFIX))
        staging.rename(path)
        self._path = path
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
            return
        if self._path is not None:
            (self._path / self.KEPT_MARKER).touch()
        self._unlock()

    def remove(self) -> None:
        """Delete the workspace and everything in it (a test run may have made it read-only)."""
        if self._path is not None and self._path.exists():
            shutil.rmtree(self._path, onerror=_make_writable_and_retry)
        self._path = None
        self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    @classmethod
    def reap_stale(
        cls, root: Path | None = None, *, prefix: str = "asa-job-", staging_age_s: float = 3600
    ) -> list[Path]:
        """Delete the workspaces under ``root`` that no live process holds (their service was
        killed), were made by :class:`Workspace` and are not kept; the ones deleted. Half-made
        ones (killed between creation and locking) go once older than ``staging_age_s``."""
        root = root or Path(tempfile.gettempdir())
        try:
            entries = list(root.iterdir())
        except OSError:
            return []
        reaped = []
        for entry in entries:
            staging = entry.name.startswith(cls.STAGING_PREFIX)
            if not (entry.name.startswith(prefix) or staging):
                continue
            try:
                fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except OSError:
                continue  # not a directory, or gone already
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if (entry / cls.KEPT_MARKER).exists() or not (
                    staging or (entry / cls.MARKER).exists()
                ):
                    continue  # kept, or not one of ours (an older version's, in use maybe)
                if staging and time.time() - os.fstat(fd).st_mtime < staging_age_s:
                    continue
                shutil.rmtree(entry, onerror=_make_writable_and_retry)
                reaped.append(entry)
            except OSError:
                continue  # locked: in use by a live process
            finally:
                os.close(fd)
        return reaped


def _make_writable_and_retry(function: Callable[..., Any], path: str, _exc_info: object) -> None:
    parent = os.path.dirname(path)
    os.chmod(parent, os.stat(parent).st_mode | stat.S_IRWXU)
    if os.path.isdir(path) and not os.path.islink(path):
        os.chmod(path, os.stat(path).st_mode | stat.S_IRWXU)
    function(path)
