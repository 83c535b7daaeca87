"""What a sandboxed command sees, and the bubblewrap (``bwrap``) command line that builds it.

bubblewrap is Debian's ``bubblewrap`` package, the unprivileged sandbox Flatpak is built on. The
sandbox it builds here:

* **Namespaces**: new user, mount, PID, IPC, UTS and cgroup namespaces, and a new network
  namespace (only a loopback) unless the caller asks for the network (the https clone). Inside,
  the command runs as uid/gid 65534 with no capabilities, in a new session (no terminal to
  inject into), and cannot create further user namespaces where the kernel lets bwrap forbid it.
  Outside, its processes keep the service's uid: the user namespace maps the one to the other,
  so files it writes in the workspace belong to the service, as they did before.
* **Filesystem**: an empty root, read-only from the end of set-up, with a fresh ``/proc`` (only
  the sandbox's own processes) and a minimal ``/dev``; the toolchain paths bound read-only at
  the same place (default :func:`default_toolchain_paths`: the system's directories and the
  interpreter's prefix, never the service's virtual environment, code or data); a synthetic
  ``/etc/passwd``, ``/etc/group`` and ``/etc/hosts`` (no host account or name); and the only
  writable places: a private, size-capped ``/tmp`` and ``/dev/shm``, the paths the caller makes
  writable, and in *scratch-copy* mode a size-capped tmpfs at the working directory holding a
  copy of it (the host's directory is then only read, through :data:`SOURCE_MOUNT`).
  Nothing else of the host exists in there: not the database or spool, not the service's code,
  not ``/root``, ``/home``, the host's ``/tmp`` or ``/run`` (so no unix socket; abstract unix
  sockets belong to the network namespace, shared only with ``network=True``).
* **Lifetime**: ``--die-with-parent`` (SIGKILL when the thread that started it dies, the
  service included) and bwrap's own PID 1, whose exit kills everything left in the namespace.
  bwrap sets up its PID 1 in a few milliseconds during which its own parent's death does not
  reach it, so the runner also starts the command under a deadline of its own inside the
  sandbox (``timeout -s KILL``, a little after the run's): nothing outlives its deadline.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SANDBOX_UID = 65534
SANDBOX_GID = 65534
# Where the host's working directory is visible (read-only) in scratch-copy mode.
SOURCE_MOUNT = "/.asa-source"
SANDBOX_HOME = "/tmp/home"  # noqa: S108 - the sandbox's own private /tmp
INSTALL_HINT = "apt-get install bubblewrap"
# Present on a Debian-like system; each is bound read-only if it exists (a symlink, such as a
# merged-/usr /bin, is recreated as the same symlink). Each bind costs a mount per command: what
# a toolchain needs to run, no more. SANDBOX_RO_PATHS replaces the whole list (with /opt/node...).
SYSTEM_PATHS = (
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc/alternatives",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/etc/nsswitch.conf",
)
# Only with network=True: name resolution as the host does it.
NETWORK_PATHS = ("/etc/resolv.conf", "/etc/hosts", "/etc/host.conf", "/etc/gai.conf")
_PROBE_TIMEOUT_S = 10.0
# Copies the working directory into its tmpfs, then runs the command in its place.
_COPY_SCRIPT = (
    'src="$1"; quota="$2"; shift 2; '
    'cp -dR --preserve=mode,timestamps "$src"/. . || { '
    'echo "asa-sandbox: could not copy the workspace into the sandbox (disk quota: $quota MB)" >&2;'
    " exit 125; }; "
    'exec "$@"'
)


@dataclass(frozen=True)
class SandboxPolicy:
    """What the sandbox may see and take, beyond a run's own time, CPU and memory limits."""

    toolchain: tuple[Path, ...] | None = None
    """Host paths visible read-only at the same place; None: :func:`default_toolchain_paths`."""
    tmp_mb: int = 256
    """Size of the private ``/tmp`` (and, separately, of ``/dev/shm``)."""
    disk_mb: int = 1024
    """Size of the working directory's copy in scratch-copy mode."""
    max_processes: int | None = 512
    """Processes and threads at once (a cgroup's ``pids.max``); None: no cap."""
    uid: int = SANDBOX_UID
    gid: int = SANDBOX_GID

    def visible_paths(self) -> tuple[Path, ...]:
        return self.toolchain if self.toolchain is not None else default_toolchain_paths()


@dataclass(frozen=True)
class Bwrap:
    """A bubblewrap that works on this machine."""

    executable: str
    disable_userns: bool
    """Whether ``--disable-userns`` works here (bubblewrap >= 0.8 and kernel support)."""


@functools.cache
def default_toolchain_paths() -> tuple[Path, ...]:
    """The system's directories (:data:`SYSTEM_PATHS` that exist) and the interpreter's prefix.

    The prefix is ``sys.base_prefix`` (and ``sys.base_exec_prefix``), the installation the
    service's virtual environment was made from, bound only when it lies outside ``/usr``. The
    virtual environment itself is never included.
    """
    paths = [Path(p) for p in SYSTEM_PATHS if os.path.lexists(p)]
    for prefix in dict.fromkeys((sys.base_prefix, sys.base_exec_prefix)):
        real = Path(os.path.realpath(prefix))
        if real.is_dir() and not is_within(real, [Path("/usr")]):
            paths.append(real)
    return tuple(paths)


def probe_bwrap(executable: str | None = None) -> Bwrap | str:
    """A working bubblewrap, or why there is none (a sentence saying what to install)."""
    found = executable or shutil.which("bwrap")
    if found is None:
        return f"bubblewrap is not installed (install it with `{INSTALL_HINT}`)"
    last_error = ""
    for disable_userns in (True, False):
        argv = build_argv(
            Bwrap(found, disable_userns),
            SandboxPolicy(),
            ["true"],
            cwd=None,
            home=None,
            read_only=(),
            network=False,
            scratch_copy=False,
            data_fd=None,
        )
        try:
            probe = subprocess.run(  # noqa: S603 - a fixed argument vector
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=_PROBE_TIMEOUT_S,
                check=False,
                env={"PATH": "/usr/bin:/bin"},
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"bubblewrap at {found} could not be run ({exc}); install `{INSTALL_HINT}`"
        if probe.returncode == 0:
            return Bwrap(found, disable_userns)
        last_error = probe.stderr.decode(errors="replace").strip()[-300:]
    return (
        f"bubblewrap at {found} cannot build a sandbox here ({last_error}); it needs user "
        f"namespaces (`{INSTALL_HINT}` installs it)"
    )


def build_argv(
    bwrap: Bwrap,
    policy: SandboxPolicy,
    argv: Sequence[str],
    *,
    cwd: Path | None,
    home: Path | None,
    read_only: Iterable[Path],
    network: bool,
    scratch_copy: bool,
    data_fd: Callable[[bytes], int] | None,
    deadline: Sequence[str] = (),
) -> list[str]:
    """The full command line: ``bwrap <options> -- argv`` (see the module docstring).

    ``data_fd`` turns file contents into a readable descriptor that the child inherits (the
    synthetic ``/etc`` files); without it, those files are left out (the probe). In
    ``scratch_copy`` mode ``cwd`` is a private copy of the host's ``cwd``; otherwise ``cwd`` is
    bound writable; ``home``, when given, is bound writable. Without ``cwd`` (the probe) the command
    runs in ``/`` and nothing is writable but the private ``/tmp``. ``deadline`` (a ``timeout``
    command line, see :func:`app.sandbox.runner.inner_deadline`) runs first in the sandbox.
    """
    uid, gid = policy.uid, policy.gid
    args = [
        bwrap.executable,
        "--unshare-all",
        "--unshare-user",
        *(("--disable-userns",) if bwrap.disable_userns else ()),
        *(("--share-net",) if network else ()),
        *("--uid", str(uid), "--gid", str(gid)),
        *("--hostname", "asa-sandbox"),
        "--new-session",
        "--die-with-parent",
        *("--cap-drop", "ALL"),
        *("--proc", "/proc"),
        *("--dev", "/dev"),
        # The sandbox's own, private and size-capped: nothing of the host's.
        *_tmpfs("/dev/shm", policy.tmp_mb),  # noqa: S108
        *_tmpfs("/tmp", policy.tmp_mb),  # noqa: S108
        *("--dir", SANDBOX_HOME),
    ]
    visible = list(policy.visible_paths())
    if network:
        visible += [Path(p) for p in NETWORK_PATHS if os.path.lexists(p)]
    for path in visible:
        args += _expose(path)
    if data_fd is not None:
        home_dir = str(home) if home is not None else SANDBOX_HOME
        files = {
            "/etc/passwd": f"asa:x:{uid}:{gid}:ASA sandbox:{home_dir}:/bin/sh\n",
            "/etc/group": f"asa:x:{gid}:\n",
        }
        if not network:
            files["/etc/hosts"] = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n"
        for dest, text in files.items():
            args += ["--ro-bind-data", str(data_fd(text.encode())), dest]
    for path in read_only:
        args += ["--ro-bind", str(path), str(path)]
    if cwd is not None and scratch_copy:
        args += ["--ro-bind", str(cwd), SOURCE_MOUNT, *_tmpfs(str(cwd), policy.disk_mb)]
    elif cwd is not None:
        args += ["--bind", str(cwd), str(cwd)]
    if home is not None:
        args += ["--bind", str(home), str(home)]
    args += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", str(cwd or "/"), "--"]
    args += deadline
    if cwd is not None and scratch_copy:
        args += ["/bin/sh", "-c", _COPY_SCRIPT, "asa-copy", SOURCE_MOUNT, str(policy.disk_mb)]
    return [*args, *argv]


def sandbox_path(host_path: str, visible: Sequence[Path]) -> str:
    """``PATH`` inside the sandbox: the interpreter's ``bin`` first (when it is bound outside
    ``/usr``), then the host's entries that the sandbox can see."""
    entries = [
        str(p / "bin")
        for p in visible
        if not is_within(p, [Path("/usr")]) and (p / "bin").is_dir() and not p.is_symlink()
    ]
    entries += [
        entry
        for entry in host_path.split(":")
        if entry.startswith("/") and is_within(Path(entry), visible)
    ]
    return ":".join(dict.fromkeys(entries)) or "/usr/bin:/bin"


def resolve_executable(name: str, path: str, visible: Sequence[Path]) -> Path | None:
    """Where ``name`` (``argv[0]``) is inside the sandbox, judged from the host; None if the
    sandbox cannot see it. ``visible``: every host path the sandbox has at the same place. A
    relative name with a slash (``./run-tests``) is left to the command's directory."""
    if "/" not in name:
        found = shutil.which(name, path=path)
        return Path(found) if found is not None else None
    if not name.startswith("/"):
        return Path(name)
    candidate = Path(name)
    if not is_within(candidate, visible) or not os.access(candidate, os.X_OK):
        return None
    return candidate


def _tmpfs(dest: str, size_mb: int) -> list[str]:
    return ["--size", str(size_mb * 1024 * 1024), "--tmpfs", dest]


def _expose(path: Path) -> list[str]:
    """Read-only at the same place, if it exists; a top-level symlink (merged /usr) stays a
    symlink."""
    if path.is_symlink() and path.parent == Path("/"):
        return ["--symlink", os.readlink(path), str(path)]
    return ["--ro-bind-try", str(path), str(path)]


def is_within(path: Path, roots: Iterable[Path]) -> bool:
    """``path`` is one of ``roots`` or below one (by name: no symlink is resolved)."""
    text = str(path)
    return any(text == str(root) or text.startswith(str(root).rstrip("/") + "/") for root in roots)
