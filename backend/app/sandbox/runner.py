"""Run an untrusted command (a repository's tests, git) with every resource bounded.

What a run may rely on:

* **No shell.** ``argv`` is executed as is; :func:`parse_test_command` splits a command line.
* **Time.** A wall-clock deadline, after which the whole process group gets SIGKILL. The group is
  also killed when the command exits, so background processes it started do not outlive it.
* **Output.** Read incrementally; only the first quarter and the last three quarters of the cap
  are kept (a test run's verdict is at its end), so a flood costs no memory.
* **Environment.** Built from a short allowlist; nothing is copied wholesale from the service's
  environment, and names that look like secrets are refused even when asked for.
* **CPU and memory.** ``RLIMIT_CPU`` and ``RLIMIT_AS`` through util-linux ``prlimit`` (so no
  ``preexec_fn`` runs in a forked copy of our threaded process); ``preexec_fn`` only when
  ``prlimit`` is missing. ``RLIMIT_NPROC`` is not set: it counts every process of the real user,
  the service included, and root ignores it. A fork bomb is bounded by the deadline instead.
* **Namespaces**, when ``unshare`` works here (as root, or with user namespaces): a new PID
  namespace, whose processes all die with its first process, so even a child that escaped the
  process group with ``setsid`` is killed; and, unless ``network=True``, a new network namespace
  with only a down loopback. Where namespaces are unavailable the run proceeds without them and
  :attr:`RunResult.network_isolated` says so. A ``/bin/sh`` stands as PID 1 of the namespace and
  runs the command as its child: PID 1 ignores signals it has no handler for (a test killing
  itself, SIGXCPU at the CPU limit), which the command itself must not.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import resource
import selectors
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
_SECRET_NAME = re.compile(
    r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|COOKIE|SESSION|DATABASE_URL|DSN", re.IGNORECASE
)
_SHELL_OPERATORS = frozenset({"|", "||", "&", "&&", ";", ";;", ">", ">>", "<", "<<", "2>&1"})
_READ_CHUNK = 64 * 1024
_POLL_S = 0.1  # how often a quiet child is checked for exit
_REAP_TIMEOUT_S = 5.0  # a SIGKILLed process is gone well within this
_PROBE_TIMEOUT_S = 5.0
# PID 1 of a new PID namespace: it runs the command as a child (not the shell's last-command
# exec, thanks to "; exit") and exits with its status (128+N after a signal).
_NAMESPACE_INIT = ("--", "/bin/sh", "-c", '"$@"; exit "$?"', "asa-init")


class InvalidTestCommand(ValueError):
    """The test command cannot be run as an argument vector."""


@dataclass(frozen=True)
class Isolation:
    """How this machine can isolate a child: argv prefixes that enter new namespaces."""

    offline_prefix: tuple[str, ...] | None
    """Enters new network (and, if possible, PID) namespaces; ``None`` if that does not work."""
    online_prefix: tuple[str, ...]
    """Enters a new PID namespace if possible (empty if not); the network stays reachable."""
    prlimit: str | None
    """Path of the ``prlimit`` executable, if any."""


@dataclass(frozen=True)
class RunResult:
    """The outcome of one sandboxed run."""

    argv: tuple[str, ...]
    exit_code: int
    """The command's exit status. After a timeout, ``-9``. A command killed by signal N reports
    128+N inside a PID namespace (its status as seen by the shell standing as PID 1), -N outside.
    """
    output: str
    """Interleaved stdout and stderr, at most ``max_output_bytes`` characters, note included."""
    truncated: bool
    output_bytes: int
    """How many bytes the command wrote in total."""
    timed_out: bool
    duration_s: float
    network_isolated: bool


def parse_test_command(command: str | Sequence[str]) -> list[str]:
    """An argument vector for ``command``: a command line is split like a POSIX shell would.

    Shell operators (``|``, ``&&``, ``>`` ...) are refused rather than passed on as arguments;
    a command that needs them must say ``sh -c '...'`` explicitly.
    """
    if isinstance(command, str):
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise InvalidTestCommand(f"cannot split the test command: {exc}") from exc
    else:
        argv = list(command)
    if not argv or not all(isinstance(arg, str) for arg in argv) or not argv[0]:
        raise InvalidTestCommand("the test command is empty")
    if any("\x00" in arg for arg in argv):
        raise InvalidTestCommand("the test command contains a NUL character")
    operators = sorted({arg for arg in argv if arg in _SHELL_OPERATORS})
    if operators:
        raise InvalidTestCommand(
            f"the test command uses shell operators {operators}, but no shell runs it; "
            "use \"sh -c '...'\" if a shell is really needed"
        )
    return argv


@functools.cache
def detect_isolation() -> Isolation:
    """Probe (once per process) which ``unshare`` invocations work on this machine."""
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
    return Isolation(offline_prefix=offline, online_prefix=online, prlimit=shutil.which("prlimit"))


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


def build_child_env(
    home: Path,
    *,
    env_allow: Iterable[str] = (),
    extra_env: Mapping[str, str] | None = None,
    secret_names: Iterable[str] = (),
) -> dict[str, str]:
    """The complete environment of a sandboxed child.

    Fixed entries, plus ``env_allow`` names copied from this process (only those), plus
    ``extra_env``. A name in ``secret_names`` or one that looks like a credential raises
    ``ValueError``: the caller asked for something that must not leave the service.
    """
    env = {
        "PATH": os.environ.get("PATH", _DEFAULT_PATH),
        "HOME": str(home),
        "TMPDIR": str(home),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "NO_COLOR": "1",
        "TERM": "dumb",
        "CI": "true",  # test runners then skip watch modes and interactive prompts
        "GIT_TERMINAL_PROMPT": "0",
    }
    forbidden = {name.upper() for name in secret_names}
    requested = {name: os.environ[name] for name in env_allow if name in os.environ}
    requested.update(extra_env or {})
    for name, value in requested.items():
        if name.upper() in forbidden or _SECRET_NAME.search(name):
            raise ValueError(f"refusing to pass {name} to a sandboxed command: it may be a secret")
        env[name] = value
    return env


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
) -> RunResult:
    """Run ``argv`` in ``cwd`` under the limits described in this module's docstring.

    ``home`` becomes ``HOME`` and ``TMPDIR`` (a private temporary directory, removed afterwards,
    when not given). ``isolation`` defaults to :func:`detect_isolation`. Raises ``OSError`` only
    when the command cannot be started at all (e.g. the executable does not exist).
    """
    if timeout_s <= 0 or max_output_bytes < 64:
        raise ValueError("timeout_s must be positive and max_output_bytes at least 64")
    isolation = isolation or detect_isolation()
    with tempfile.TemporaryDirectory(prefix="asa-home-") as scratch:
        env = build_child_env(
            home or Path(scratch),
            env_allow=env_allow,
            extra_env=extra_env,
            secret_names=secret_names,
        )
        prefix: tuple[str, ...] = isolation.online_prefix
        isolated = False
        if not network and isolation.offline_prefix is not None:
            prefix, isolated = isolation.offline_prefix, True
        limits = _limit_args(isolation.prlimit, cpu_seconds, memory_mb)
        preexec = None if isolation.prlimit else _limit_preexec(cpu_seconds, memory_mb)
        started = time.monotonic()
        process = subprocess.Popen(  # noqa: S603 - an argument vector, never a shell
            [*limits, *prefix, *argv],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            preexec_fn=preexec,  # only without prlimit; see the module docstring
        )
        output = _CappedOutput(max_output_bytes)
        timed_out = _pump(process, output, started + timeout_s)
        _kill_group(process)
        _drain(process, output)
        return RunResult(
            argv=tuple(argv),
            exit_code=process.returncode,
            output=output.render(),
            truncated=output.truncated,
            output_bytes=output.total,
            timed_out=timed_out,
            duration_s=time.monotonic() - started,
            network_isolated=isolated,
        )


def _limit_args(prlimit: str | None, cpu_seconds: int | None, memory_mb: int | None) -> list[str]:
    if prlimit is None:
        return []
    args = [prlimit, "--core=0"]
    if cpu_seconds is not None:
        # Soft limit sends SIGXCPU, the hard limit a second later SIGKILL.
        args.append(f"--cpu={cpu_seconds}:{cpu_seconds + 1}")
    if memory_mb is not None:
        args.append(f"--as={memory_mb * 1024 * 1024}")
    return [*args, "--"]


def _limit_preexec(cpu_seconds: int | None, memory_mb: int | None) -> Callable[[], None] | None:
    if cpu_seconds is None and memory_mb is None:
        return None

    def set_limits() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if cpu_seconds is not None:
            resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        if memory_mb is not None:
            limit = memory_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return set_limits


class _CappedOutput:
    """The head and the tail of a byte stream, never more than ``cap`` bytes in memory."""

    _NOTE = "\n[... {omitted} bytes of output omitted ...]\n"

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.head_cap = cap // 4
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    @property
    def truncated(self) -> bool:
        return self.total > self.cap

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        self.tail += chunk
        excess = len(self.tail) - (self.cap - self.head_cap)
        if excess > 0:
            del self.tail[:excess]

    def render(self) -> str:
        if not self.truncated:
            return (self.head + self.tail).decode("utf-8", errors="replace")
        kept_tail = self.cap - len(self.head) - len(self._NOTE) - 20  # room for the number
        omitted = self.total - len(self.head) - kept_tail
        note = self._NOTE.format(omitted=omitted)
        head = self.head.decode("utf-8", errors="replace")
        tail = self.tail[len(self.tail) - kept_tail :].decode("utf-8", errors="replace")
        return head + note + tail


def _pump(process: subprocess.Popen[bytes], output: _CappedOutput, deadline: float) -> bool:
    """Copy the child's output into ``output`` until it exits; True if the deadline came first."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    os.set_blocking(fd, False)
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            if not selector.select(timeout=min(remaining, _POLL_S)):
                if _has_exited(process):
                    # A background process may hold the pipe open forever; the command is done.
                    return False
                continue
            try:
                chunk = os.read(fd, _READ_CHUNK)
            except BlockingIOError:
                continue
            if chunk:
                output.add(chunk)
                continue
            # End of output: everything that could write has closed the pipe.
            pause = 0.001
            while not _has_exited(process):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return True
                time.sleep(min(remaining, pause))
                pause = min(pause * 2, _POLL_S)
            return False


def _has_exited(process: subprocess.Popen[bytes]) -> bool:
    # WNOWAIT leaves the child a zombie, so its PID, which is also the process group's id,
    # cannot be reused before _kill_group has signalled the group.
    try:
        status = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True  # reaped by someone else (a process-wide child watcher)
    return status is not None


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL everything left in the child's process group, then reap the child."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    # A process stuck in uninterruptible I/O outlives the wait; it has SIGKILL pending anyway.
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=_REAP_TIMEOUT_S)


def _drain(process: subprocess.Popen[bytes], output: _CappedOutput) -> None:
    """Keep what the killed processes wrote before they died, then close the pipe."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    try:
        while chunk := os.read(fd, _READ_CHUNK):
            output.add(chunk)
    except BlockingIOError:
        pass  # a writer outside the group still holds the pipe; stop here
    finally:
        process.stdout.close()
