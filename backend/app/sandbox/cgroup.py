"""Aggregate caps for one sandboxed command: a cgroup of its own with a memory and a process cap.

Per-process limits (``RLIMIT_AS``) let a command take the cap once per process; a cgroup counts
every process of the command together, tmpfs pages it writes included. Both layouts exist in
the wild and are detected at run time:

* **v2**, ``/sys/fs/cgroup`` a ``cgroup2`` mount with the ``memory`` and ``pids`` controllers
  available to the service's own cgroup. Controllers can only be handed down from a cgroup
  without processes, so when the service's cgroup holds the service alone, the service moves
  itself into a leaf ``asa-service`` beside the sandboxes (the usual rule for a delegated
  subtree); when it holds other processes too, cgroups are reported unavailable.
* **v1**, separate ``memory`` and ``pids`` hierarchies, each holding a copy of the tree below.

The tree, under the service's own cgroup in each hierarchy: ``asa-sandbox/<owner>/<run>``, where
``<owner>`` is ``<pid>-<start time>`` of the service process that made it. A run's cgroup is
made before its command starts (the command enters it before it can fork), killed and removed
after it ends; :func:`reap_cgroups` kills and removes what a dead owner left behind (the
service was SIGKILLed). Killing goes through ``cgroup.kill`` where v2 has it, else through a
``pidfd`` per process re-checked as a member after it is opened, so a PID reused meanwhile is
never signalled.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

BASE_NAME = "asa-sandbox"
SERVICE_LEAF = "asa-service"
_CONTROLLERS = ("memory", "pids")
_KILL_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class CgroupSupport:
    """Where this process makes its sandboxes' cgroups."""

    version: int
    bases: tuple[Path, ...]
    """The ``asa-sandbox`` directory: one for v2, one per hierarchy (memory, pids) for v1."""

    @property
    def owner_dirs(self) -> tuple[Path, ...]:
        return tuple(base / owner_name(os.getpid()) for base in self.bases)


@functools.cache
def owner_name(pid: int) -> str:
    """``<pid>-<start time>``: names a process uniquely for as long as the machine is up."""
    start = _start_time(pid)
    if start is None:
        raise OSError(f"cannot read the start time of process {pid}")
    return f"{pid}-{start}"


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks


def probe_cgroups(root: Path = Path("/sys/fs/cgroup")) -> CgroupSupport | str:
    """Where sandbox cgroups can be made, or why they cannot (a sentence for the log)."""
    try:
        mounts = _cgroup_mounts()
        own = _own_cgroups()
    except OSError as exc:
        return f"cannot read this process's cgroups ({exc})"
    unified = next((m for m in mounts if m[0] == root and m[1] == "cgroup2"), None)
    try:
        if unified is not None:
            return _probe_v2(root / own.get("", "/").lstrip("/"))
        return _probe_v1(mounts, own)
    except OSError as exc:
        return f"cannot make cgroups here ({exc.strerror or exc})"


def _probe_v1(
    mounts: list[tuple[Path, str, frozenset[str], str]], own: dict[str, str]
) -> CgroupSupport | str:
    bases = []
    for controller in _CONTROLLERS:
        mount = next((m for m in mounts if m[1] == "cgroup" and controller in m[2]), None)
        if mount is None:
            return f"no cgroup v1 hierarchy with the {controller} controller is mounted"
        mountpoint, _fstype, _options, mount_root = mount
        path = next((p for names, p in own.items() if controller in names.split(",")), "/")
        relative = os.path.relpath(path, mount_root) if path.startswith(mount_root) else path
        relative = "" if relative == "." else relative.lstrip("/")
        base = mountpoint / relative / BASE_NAME
        base.mkdir(exist_ok=True)
        bases.append(base)
    support = CgroupSupport(version=1, bases=tuple(bases))
    _check_writable(support)
    return support


def _probe_v2(own: Path) -> CgroupSupport | str:
    available = (own / "cgroup.controllers").read_text().split()
    missing = [c for c in _CONTROLLERS if c not in available]
    if missing:
        return f"the cgroup v2 controllers {missing} are not available to this process's cgroup"
    base = own / BASE_NAME
    if not _subtree_enabled(own):
        try:
            _enable_controllers(own)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            members = (own / "cgroup.procs").read_text().split()
            if members != [str(os.getpid())]:
                return (
                    f"this process's cgroup {own} holds other processes, so no controller "
                    "can be handed down to sandboxes"
                )
            leaf = own / SERVICE_LEAF
            leaf.mkdir(exist_ok=True)
            (leaf / "cgroup.procs").write_text(str(os.getpid()))
            _enable_controllers(own)
    base.mkdir(exist_ok=True)
    _enable_controllers(base)
    support = CgroupSupport(version=2, bases=(base,))
    _check_writable(support)
    return support


def _check_writable(support: CgroupSupport) -> None:
    """Make (and remove) a run cgroup with limits, as :class:`RunCgroup` will."""
    probe = RunCgroup(support, memory_mb=64, max_processes=8)
    probe.remove()


def _subtree_enabled(directory: Path) -> bool:
    enabled = (directory / "cgroup.subtree_control").read_text().split()
    return all(c in enabled for c in _CONTROLLERS)


def _enable_controllers(directory: Path) -> None:
    if not _subtree_enabled(directory):
        (directory / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in _CONTROLLERS))


def _cgroup_mounts() -> list[tuple[Path, str, frozenset[str], str]]:
    """(mount point, fstype, super options, mount root) of every cgroup mount."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        mountpoint = Path(fields[4].replace("\\040", " "))
        found.append((mountpoint, tail[0], frozenset(tail[2].split(",")), fields[3]))
    return found


def _own_cgroups() -> dict[str, str]:
    """Controller list (``""`` for v2) → this process's cgroup path in that hierarchy."""
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _id, controllers, path = line.split(":", 2)
        own[controllers] = path
    return own


class RunCgroup:
    """The cgroup of one run: made with its caps, entered by the command, killed, removed."""

    def __init__(
        self, support: CgroupSupport, *, memory_mb: int | None, max_processes: int | None
    ) -> None:
        self.support = support
        name = uuid.uuid4().hex[:12]
        self.dirs = tuple(owner / name for owner in support.owner_dirs)
        for owner in support.owner_dirs:
            if not owner.is_dir():
                owner.mkdir(exist_ok=True)
                if support.version == 2:
                    _enable_controllers(owner)
        made: list[Path] = []
        try:
            for directory in self.dirs:
                directory.mkdir()
                made.append(directory)
            self._limit(memory_mb, max_processes)
        except BaseException:
            for directory in made:
                with contextlib.suppress(OSError):
                    directory.rmdir()
            raise

    def _limit(self, memory_mb: int | None, max_processes: int | None) -> None:
        memory = None if memory_mb is None else str(memory_mb * 1024 * 1024)
        pids = None if max_processes is None else str(max_processes)
        if self.support.version == 2:
            (directory,) = self.dirs
            if memory is not None:
                (directory / "memory.max").write_text(memory)
                _write_if_present(directory / "memory.swap.max", "0")
            if pids is not None:
                (directory / "pids.max").write_text(pids)
            return
        memory_dir, pids_dir = self.dirs
        if memory is not None:
            (memory_dir / "memory.limit_in_bytes").write_text(memory)
            # With swap accounting, memory + swap gets the same cap (else swap is a way out).
            _write_if_present(memory_dir / "memory.memsw.limit_in_bytes", memory)
        if pids is not None:
            (pids_dir / "pids.max").write_text(pids)

    @property
    def procs_files(self) -> tuple[Path, ...]:
        """Where a process writes its PID to enter this cgroup (every hierarchy's)."""
        return tuple(directory / "cgroup.procs" for directory in self.dirs)

    def limits_hit(self) -> tuple[str, ...]:
        """``"memory"`` if a process was OOM-killed, ``"processes"`` if a fork was refused."""
        hit = []
        if self.support.version == 2:
            (directory,) = self.dirs
            memory_events, pids_events = directory / "memory.events", directory / "pids.events"
        else:
            memory_events = self.dirs[0] / "memory.oom_control"
            pids_events = self.dirs[1] / "pids.events"
        if _counter(memory_events, "oom_kill") > 0:
            hit.append("memory")
        if _counter(pids_events, "max") > 0:
            hit.append("processes")
        return tuple(hit)

    def kill(self) -> bool:
        """SIGKILL every process in the cgroup; True once it is empty (within ~2 s)."""
        return all(kill_cgroup(directory) for directory in self.dirs)

    def remove(self) -> None:
        """Kill what is left and remove the cgroup (a leftover is the reaper's)."""
        for directory in self.dirs:
            remove_cgroup(directory)


def kill_cgroup(directory: Path, timeout_s: float = _KILL_TIMEOUT_S) -> bool:
    """SIGKILL every process in ``directory`` until it is empty; False if it is not in time."""
    kill_file = directory / "cgroup.kill"
    if kill_file.exists():
        with contextlib.suppress(OSError):
            kill_file.write_text("1")
    deadline = time.monotonic() + timeout_s
    while True:
        members = _members(directory)
        if not members:
            return True
        if time.monotonic() > deadline:
            return False
        _signal_members(directory, members)
        # Usually the sandbox's PID 1 finishing its exit: a few milliseconds, worth polling for.
        time.sleep(0.001)


def remove_cgroup(directory: Path) -> None:
    if not directory.exists():
        return
    kill_cgroup(directory)
    deadline = time.monotonic() + _KILL_TIMEOUT_S
    while True:
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                logger.warning("Could not remove the sandbox cgroup %s: %s", directory, exc)
                return
            time.sleep(0.01)


def reap_cgroups(support: CgroupSupport) -> int:
    """Kill and remove the run cgroups of owners that are no longer running; how many runs."""
    reaped: set[tuple[str, str]] = set()
    for base in support.bases:
        for owner in _subdirs(base):
            pid, _, start = owner.name.partition("-")
            if pid.isdigit() and _start_time(int(pid)) == start:
                continue  # its service is alive (this one included)
            for run in _subdirs(owner):
                remove_cgroup(run)
                reaped.add((owner.name, run.name))
            with contextlib.suppress(OSError):
                owner.rmdir()
    return len(reaped)


def _subdirs(directory: Path) -> Iterator[Path]:
    try:
        entries = list(directory.iterdir())
    except OSError:
        return
    yield from (entry for entry in entries if entry.is_dir())


def _members(directory: Path) -> set[int]:
    try:
        return {int(pid) for pid in (directory / "cgroup.procs").read_text().split()}
    except OSError:
        return set()


def _signal_members(directory: Path, members: set[int]) -> None:
    """SIGKILL through pidfds opened first and checked against a fresh read of the members."""
    pidfds: dict[int, int] = {}
    try:
        for pid in members:
            try:
                pidfds[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            except OSError:  # no pidfds (Linux < 5.3): a plain kill, racy as it is
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        still = _members(directory)
        for pid, pidfd in pidfds.items():
            if pid in still:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        for pidfd in pidfds.values():
            os.close(pidfd)


def _counter(events: Path, name: str) -> int:
    try:
        lines = events.read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        key, _, value = line.partition(" ")
        if key == name and value.strip().isdigit():
            return int(value)
    return 0


def _write_if_present(path: Path, value: str) -> None:
    if path.exists():
        with contextlib.suppress(OSError):
            path.write_text(value)
