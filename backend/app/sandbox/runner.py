"""Run an untrusted command (a repository's tests, git) confined, with every resource bounded.

What a run may rely on:

* **Confinement.** Under bubblewrap when it works here (:mod:`app.sandbox.bwrap` says what the
  command sees: its working directory, the toolchain read-only, a private ``/tmp``; nothing of
  the service). Without it, the *legacy* confinement below, which isolates processes and the
  network but not the filesystem: callers decide whom they run it for (the orchestrator: only
  the local administrator of open mode). :attr:`RunResult.sandbox` says which one ran.
* **No shell.** ``argv`` is executed as is; :func:`parse_test_command` splits a command line.
* **Time.** A wall-clock deadline, after which everything the command started gets SIGKILL.
  Everything is also killed when the command exits, so background processes it started do not
  outlive it, and at once when ``cancel`` is set (checked every 0.1 s).
* **Death of the service.** The command gets SIGKILL if the thread that started it dies:
  bubblewrap's ``--die-with-parent`` (its PID 1 takes the whole sandbox along), or in legacy
  confinement util-linux ``setpriv --pdeathsig`` on ``unshare``. A SIGKILLed service leaves no
  command running; where that has a gap (bubblewrap's first milliseconds, before it arms its
  own), the command's own deadline (:func:`inner_deadline`, inside the sandbox) still ends it.
  The run's cgroup and workspace stay; the next start reaps them (:mod:`app.sandbox.reap`).
* **Aggregate memory and processes.** A cgroup per run (:mod:`app.sandbox.cgroup`) caps the
  memory of all its processes together and their number; the command enters it before it can
  fork, and the cgroup is killed and removed after the run. Without cgroups, only the
  per-process limits below hold (:attr:`Isolation.cgroups_missing` says why).
* **Disk.** With ``scratch_copy`` (test runs) the command works on a copy of ``cwd`` in a
  size-capped tmpfs (:attr:`SandboxPolicy.disk_mb`), and ``/tmp`` and ``/dev/shm`` are
  size-capped tmpfs too: those are the only places it can write, all in memory the cgroup
  counts, all gone when it ends; the host's ``cwd`` is only read. Without ``scratch_copy`` (our
  own git commands) ``cwd`` (and ``home``) are bound writable. In legacy confinement the copy is
  a host temporary directory, without a quota.
* **Output.** Read incrementally; only the first quarter and the last three quarters of the cap
  are kept (a test run's verdict is at its end), so a flood costs no memory.
* **Environment.** Built from a short allowlist; nothing is copied wholesale from the service's
  environment, and names that look like secrets are refused even when asked for. Under
  bubblewrap ``PATH`` keeps only what the sandbox can see, and ``HOME`` is a private directory
  unless ``home`` is given.
* **CPU and per-process memory.** ``RLIMIT_CPU`` (SIGXCPU, then SIGKILL a second later) and
  ``RLIMIT_AS``, set by the launcher: a ``/bin/sh`` that enters the run's cgroup, sets the
  limits with ``ulimit`` and becomes the rest of the command line, so no ``preexec_fn`` runs in
  a forked copy of our threaded process. A single allocation over ``memory_mb`` fails cleanly
  (``MemoryError``) instead of meeting the OOM killer. ``RLIMIT_NPROC`` is not set: it counts
  every process of the real user, the service included; the cgroup caps processes.
* **Legacy namespaces**, when ``unshare`` works here: a new PID namespace, whose processes all
  die with its first process, and, unless ``network=True``, a new network namespace with only a
  down loopback. A ``/bin/sh`` stands as PID 1 of the namespace and runs the command as its
  child: PID 1 ignores signals it has no handler for (a test killing itself, SIGXCPU at the CPU
  limit), which the command itself must not.

A command killed by signal N reports 128+N inside a PID namespace (bubblewrap's or the legacy
one), -N outside; after a timeout or a cancellation, -9.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import math
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from app.sandbox import bwrap as bwrap_args
from app.sandbox.bwrap import Bwrap, SandboxPolicy, probe_bwrap
from app.sandbox.cgroup import CgroupSupport, RunCgroup, probe_cgroups
from app.sandbox.command import InvalidTestCommand, build_child_env, parse_test_command
from app.sandbox.output import Cancellation, CappedOutput, drain, pump

__all__ = [  # the command's parts are re-exported: callers import them from here
    "Cancellation",
    "InvalidTestCommand",
    "Isolation",
    "RunResult",
    "build_child_env",
    "detect_isolation",
    "parse_test_command",
    "run_sandboxed",
]

logger = logging.getLogger(__name__)

_REAP_TIMEOUT_S = 5.0  # a SIGKILLed process is gone well within this
_INNER_GRACE_S = 2  # the command's own deadline, after the run's: a backstop, not the rule
_PROBE_TIMEOUT_S = 5.0
# PID 1 of a new PID namespace: it runs the command as a child (not the shell's last-command
# exec, thanks to "; exit") and exits with its status (128+N after a signal).
_NAMESPACE_INIT = ("--", "/bin/sh", "-c", '"$@"; exit "$?"', "asa-init")


@dataclass(frozen=True)
class Isolation:
    """How this machine can confine a child (see the module docstring)."""

    offline_prefix: tuple[str, ...] | None
    """Legacy: enters new network (and, if possible, PID) namespaces; ``None`` if that does not
    work."""
    online_prefix: tuple[str, ...]
    """Legacy: enters a new PID namespace if possible (empty if not); the network stays
    reachable."""
    bwrap: Bwrap | None = None
    """A working bubblewrap; None: legacy confinement (see ``bwrap_missing``)."""
    cgroups: CgroupSupport | None = None
    """Where run cgroups are made; None: per-process limits only (see ``cgroups_missing``)."""
    bwrap_missing: str | None = None
    cgroups_missing: str | None = None
    parent_death: tuple[str, ...] = ()
    """Legacy: a prefix that gives the child SIGKILL when the thread that started it dies
    (util-linux ``setpriv --pdeathsig``), so ``unshare`` dies with the service; empty if
    unavailable. (bubblewrap arms its own, ``--die-with-parent``.)"""

    def without_bwrap(self) -> Isolation:
        """The legacy confinement of this machine (benchmarks and tests compare the two)."""
        return Isolation(
            self.offline_prefix,
            self.online_prefix,
            cgroups=self.cgroups,
            bwrap_missing="bubblewrap is not used: the legacy confinement was asked for",
            cgroups_missing=self.cgroups_missing,
            parent_death=self.parent_death,
        )


@dataclass(frozen=True)
class RunResult:
    """The outcome of one sandboxed run."""

    argv: tuple[str, ...]
    exit_code: int
    """The command's exit status. After a timeout or a cancellation, ``-9``. A command killed
    by signal N reports 128+N inside a PID namespace, -N outside.
    """
    output: str
    """Interleaved stdout and stderr, at most ``max_output_bytes`` characters, note included."""
    truncated: bool
    output_bytes: int
    """How many bytes the command wrote in total."""
    timed_out: bool
    duration_s: float
    network_isolated: bool
    cancelled: bool = False
    """``cancel`` was set: the command was killed (or never started)."""
    limits_hit: tuple[str, ...] = ()
    """Aggregate caps the command ran into: ``"memory"`` (a process was OOM-killed),
    ``"processes"`` (a fork was refused)."""
    sandbox: str = "legacy"
    """``"bwrap"`` or ``"legacy"`` (see the module docstring)."""


@functools.cache
def detect_isolation() -> Isolation:
    """Probe (once per process) bubblewrap, cgroups and the legacy ``unshare`` invocations."""
    unshare = shutil.which("unshare")
    pid_ns = ("--pid", "--fork", "--kill-child", *_NAMESPACE_INIT)
    offline: tuple[str, ...] | None = None
    online: tuple[str, ...] = ()
    if unshare is not None:
        offline = _first_working(
            [
                (unshare, "--net", *pid_ns),
                (unshare, "--map-root-user", "--net", *pid_ns),
                (unshare, "--net"),
                (unshare, "--map-root-user", "--net"),
            ]
        )
        online = _first_working([(unshare, *pid_ns), (unshare, "--map-root-user", *pid_ns)]) or ()
    found_bwrap = probe_bwrap()
    cgroups = probe_cgroups()
    setpriv = shutil.which("setpriv")
    parent_death = (setpriv, "--pdeathsig", "KILL", "--") if setpriv else ()
    return Isolation(
        offline_prefix=offline,
        online_prefix=online,
        bwrap=found_bwrap if isinstance(found_bwrap, Bwrap) else None,
        cgroups=cgroups if isinstance(cgroups, CgroupSupport) else None,
        bwrap_missing=found_bwrap if isinstance(found_bwrap, str) else None,
        cgroups_missing=cgroups if isinstance(cgroups, str) else None,
        parent_death=_first_working([parent_death]) or () if parent_death else (),
    )


def _first_working(candidates: Iterable[tuple[str, ...]]) -> tuple[str, ...] | None:
    for prefix in candidates:
        try:
            probe = subprocess.run(  # noqa: S603 - fixed argument vectors
                [*prefix, "true"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=_PROBE_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return None


def run_sandboxed(
    argv: Sequence[str],
    cwd: Path,
    *,
    timeout_s: float,
    max_output_bytes: int = 256 * 1024,
    env_allow: Iterable[str] = (),
    extra_env: Mapping[str, str] | None = None,
    secret_names: Iterable[str] = (),
    home: Path | None = None,
    cpu_seconds: int | None = None,
    memory_mb: int | None = None,
    network: bool = False,
    isolation: Isolation | None = None,
    policy: SandboxPolicy | None = None,
    scratch_copy: bool = False,
    read_only: Sequence[Path] = (),
    cancel: Cancellation | None = None,
) -> RunResult:
    """Run ``argv`` in ``cwd`` under the confinement and limits of this module's docstring.

    ``home`` becomes ``HOME`` (bound writable under bubblewrap); when not given, a private
    directory removed afterwards. ``read_only`` host paths are visible read-only (a local
    repository to clone from). ``scratch_copy``: the command works on a private copy of ``cwd``.
    ``policy`` (default :class:`SandboxPolicy`) sets what the sandbox sees and its process and
    disk caps; ``memory_mb`` caps the run's memory (all processes together where cgroups work,
    each process in any case). ``isolation`` defaults to :func:`detect_isolation`. Setting
    ``cancel`` kills the command within ~0.1 s (it is not started if already set).

    Raises ``OSError`` only when the command cannot be started at all (e.g. the executable does
    not exist, or is not visible inside the sandbox).
    """
    if timeout_s <= 0 or max_output_bytes < 64:
        raise ValueError("timeout_s must be positive and max_output_bytes at least 64")
    isolation = isolation or detect_isolation()
    policy = policy or SandboxPolicy()
    sandbox = "bwrap" if isolation.bwrap is not None else "legacy"
    isolated = not network and (sandbox == "bwrap" or isolation.offline_prefix is not None)
    if cancel is not None and cancel.is_set():
        return RunResult(tuple(argv), -9, "", False, 0, False, 0.0, isolated, True, (), sandbox)
    with contextlib.ExitStack() as stack:
        launch = _Launch(argv, cwd, home, network, isolation, policy, scratch_copy, read_only)
        launch.deadline = inner_deadline(timeout_s)
        stack.callback(launch.close)
        launch.prepare(env_allow, extra_env, secret_names)
        cgroup = _run_cgroup(isolation, memory_mb, policy)
        if cgroup is not None:
            stack.callback(cgroup.remove)
        parent_death = isolation.parent_death if sandbox == "legacy" else ()
        launcher = _launcher(cgroup, cpu_seconds, memory_mb)
        started = time.monotonic()
        process = subprocess.Popen(  # noqa: S603 - an argument vector, never a shell
            [*parent_death, *launcher, *launch.argv],
            cwd=launch.cwd,
            env=launch.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            pass_fds=launch.pass_fds,
        )
        launch.started()
        output = CappedOutput(max_output_bytes)
        ended = pump(process, output, started + timeout_s, cancel)
        _kill_group(process)
        if cgroup is not None:
            cgroup.kill()
        drain(process, output)
        return RunResult(
            argv=tuple(argv),
            exit_code=process.returncode,
            output=output.render(),
            truncated=output.truncated,
            output_bytes=output.total,
            timed_out=ended == "timeout",
            duration_s=time.monotonic() - started,
            network_isolated=isolated,
            cancelled=ended == "cancelled",
            limits_hit=cgroup.limits_hit() if cgroup is not None else (),
            sandbox=sandbox,
        )
    raise AssertionError("unreachable")  # pragma: no cover - the with block returns


class _Launch:
    """The command line, environment and directories of one run, and their clean-up."""

    def __init__(
        self,
        argv: Sequence[str],
        cwd: Path,
        home: Path | None,
        network: bool,
        isolation: Isolation,
        policy: SandboxPolicy,
        scratch_copy: bool,
        read_only: Sequence[Path],
    ) -> None:
        self.command = list(argv)
        self.cwd = cwd
        self.home = home
        self.network = network
        self.isolation = isolation
        self.policy = policy
        self.scratch_copy = scratch_copy
        self.read_only = tuple(read_only)
        self.argv: list[str] = []
        self.env: dict[str, str] = {}
        self.pass_fds: tuple[int, ...] = ()
        self.deadline: list[str] = []
        self._scratch: list[tempfile.TemporaryDirectory[str]] = []

    def prepare(
        self,
        env_allow: Iterable[str],
        extra_env: Mapping[str, str] | None,
        secret_names: Iterable[str],
    ) -> None:
        bwrap = self.isolation.bwrap
        if bwrap is None:
            self._prepare_legacy(env_allow, extra_env, secret_names)
            return
        home = self.home or Path(bwrap_args.SANDBOX_HOME)
        env = build_child_env(
            home, env_allow=env_allow, extra_env=extra_env, secret_names=secret_names
        )
        visible = [*self.policy.visible_paths()]
        env["PATH"] = bwrap_args.sandbox_path(env["PATH"], visible)
        env["TMPDIR"] = "/tmp"  # noqa: S108 - the sandbox's private /tmp
        seen = [*visible, *self.read_only, self.cwd, *([self.home] if self.home else [])]
        if bwrap_args.resolve_executable(self.command[0], env["PATH"], seen) is None:
            raise FileNotFoundError(
                errno.ENOENT,
                "No such file or directory inside the sandbox (it sees only the toolchain "
                "paths and the workspace)",
                self.command[0],
            )
        # The deadline runs inside: only if the sandbox can see coreutils' `timeout` there.
        visible_deadline = self.deadline and bwrap_args.is_within(Path(self.deadline[0]), visible)
        deadline = self.deadline if visible_deadline else []
        fds: list[int] = []

        def data_fd(content: bytes) -> int:
            read_end, write_end = os.pipe()
            fds.append(read_end)
            try:
                os.write(write_end, content)  # a few hundred bytes: never fills the pipe
            finally:
                os.close(write_end)
            return read_end

        self.argv = bwrap_args.build_argv(
            bwrap,
            self.policy,
            self.command,
            cwd=self.cwd,
            home=self.home,
            read_only=self.read_only,
            network=self.network,
            scratch_copy=self.scratch_copy,
            data_fd=data_fd,
            deadline=deadline,
        )
        self.env = env
        self.pass_fds = tuple(fds)

    def _prepare_legacy(
        self,
        env_allow: Iterable[str],
        extra_env: Mapping[str, str] | None,
        secret_names: Iterable[str],
    ) -> None:
        home = self.home
        if home is None:
            home = Path(self._temporary("asa-home-"))
        self.env = build_child_env(
            home, env_allow=env_allow, extra_env=extra_env, secret_names=secret_names
        )
        if bwrap_args.resolve_executable(self.command[0], self.env["PATH"], [Path("/")]) is None:
            # The launcher would start and fail to exec it: say it as Popen would.
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", self.command[0])
        if self.scratch_copy:
            copy = Path(self._temporary("asa-run-")) / self.cwd.name
            shutil.copytree(self.cwd, copy, symlinks=True)
            self.cwd = copy
        prefix = self.isolation.online_prefix
        if not self.network and self.isolation.offline_prefix is not None:
            prefix = self.isolation.offline_prefix
        self.argv = [*prefix, *self.deadline, *self.command]

    def _temporary(self, prefix: str) -> str:
        scratch = tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True)
        self._scratch.append(scratch)
        return scratch.name

    def started(self) -> None:
        """The child has its copies of the descriptors: close ours."""
        for fd in self.pass_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pass_fds = ()

    def close(self) -> None:
        self.started()
        for scratch in reversed(self._scratch):
            scratch.cleanup()


def inner_deadline(timeout_s: float) -> list[str]:
    """``timeout -s KILL <s>``: the command's own deadline, a little after the run's, so that a
    command whose service died without taking it along still ends; in a PID namespace its end
    takes every process of the namespace along. ``--foreground`` keeps it in the command's
    process group, which the runner kills. Empty without coreutils."""
    found = shutil.which("timeout")
    if found is None:
        return []
    return [found, "--foreground", "-s", "KILL", str(math.ceil(timeout_s) + _INNER_GRACE_S)]


def _run_cgroup(
    isolation: Isolation, memory_mb: int | None, policy: SandboxPolicy
) -> RunCgroup | None:
    if isolation.cgroups is None:
        return None
    try:
        return RunCgroup(isolation.cgroups, memory_mb=memory_mb, max_processes=policy.max_processes)
    except OSError as exc:
        # The hierarchy changed under us (removed by hand?): per-process limits still hold.
        logger.warning("Could not make a cgroup for a sandboxed run: %s", exc)
        return None


def _launcher(
    cgroup: RunCgroup | None, cpu_seconds: int | None, memory_mb: int | None
) -> list[str]:
    """The ``/bin/sh`` that runs first: it enters the run's cgroup (before it can fork), sets the
    per-process limits and becomes the rest of the command line (see the module docstring)."""
    entries = cgroup.procs_files if cgroup is not None else ()
    steps = [f"echo $$ > {shlex.quote(str(path))} || exit 125" for path in entries]
    steps.append("ulimit -c 0")
    if cpu_seconds is not None:  # soft first: a hard limit below the soft one is refused
        steps += [f"ulimit -S -t {int(cpu_seconds)}", f"ulimit -H -t {int(cpu_seconds) + 1}"]
    if memory_mb is not None:
        steps.append(f"ulimit -v {int(memory_mb) * 1024}")
    return ["/bin/sh", "-c", "; ".join([*steps, 'exec "$@"']), "asa-launch"]


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL everything left in the child's process group, then reap the child.

    Under bubblewrap the group is bwrap itself: its death takes the sandbox's PID 1, and so the
    whole PID namespace, with it (``--die-with-parent``); the run's cgroup is killed after.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    # A process stuck in uninterruptible I/O outlives the wait; it has SIGKILL pending anyway.
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=_REAP_TIMEOUT_S)
