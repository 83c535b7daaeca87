"""Run cgroups on this machine's real cgroup hierarchy: caps set, every member killed, leftovers
of dead services reaped and nothing of a live one touched."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.sandbox.cgroup import (
    CgroupSupport,
    RunCgroup,
    owner_name,
    probe_cgroups,
    reap_cgroups,
)

SUPPORT = probe_cgroups()
pytestmark = pytest.mark.skipif(
    not isinstance(SUPPORT, CgroupSupport), reason=f"no cgroups here: {SUPPORT}"
)


@pytest.fixture
def support() -> CgroupSupport:
    assert isinstance(SUPPORT, CgroupSupport)
    return SUPPORT


def alive_with(token: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if token.encode() in (entry / "cmdline").read_bytes():
                    state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state not in ("Z", "X"):
                        found.append(int(entry.name))
            except OSError:
                continue
    return found


def start_in(procs_files: tuple[Path, ...], token: str) -> subprocess.Popen[bytes]:
    """A shell in the cgroup that leaves a `sleep` in a session of its own and sleeps itself."""
    enter = "; ".join(f"echo $$ > {f}" for f in procs_files)
    process = subprocess.Popen(
        ["sh", "-c", f"{enter}; setsid sleep {token} & exec sleep {token}"],
        start_new_session=True,
    )
    deadline = time.monotonic() + 5
    while len(alive_with(token)) < 2:
        assert time.monotonic() < deadline, "the sleeps did not start"
        time.sleep(0.01)
    return process


@pytest.fixture
def run_cgroup(support: CgroupSupport) -> Iterator[RunCgroup]:
    cgroup = RunCgroup(support, memory_mb=100, max_processes=10)
    yield cgroup
    cgroup.remove()


def test_a_run_cgroup_has_its_caps_and_is_removed(support: CgroupSupport) -> None:
    cgroup = RunCgroup(support, memory_mb=100, max_processes=10)

    if support.version == 2:
        (directory,) = cgroup.dirs
        assert (directory / "memory.max").read_text().strip() == str(100 * 2**20)
        assert (directory / "pids.max").read_text().strip() == "10"
    else:
        memory, pids = cgroup.dirs
        assert (memory / "memory.limit_in_bytes").read_text().strip() == str(100 * 2**20)
        assert (pids / "pids.max").read_text().strip() == "10"
    assert all(d.parent.name == owner_name(os.getpid()) for d in cgroup.dirs)

    cgroup.remove()

    assert not any(d.exists() for d in cgroup.dirs)


def test_every_member_is_killed_even_one_in_another_session(run_cgroup: RunCgroup) -> None:
    token = f"100.{secrets.randbelow(10**9)}"
    process = start_in(run_cgroup.procs_files, token)

    assert run_cgroup.kill()

    process.wait(timeout=5)
    assert alive_with(token) == []


def test_reaping_removes_dead_services_cgroups_and_spares_live_ones(
    support: CgroupSupport, run_cgroup: RunCgroup
) -> None:
    # A dead service: a process that has exited, whose run cgroup still holds a process.
    dead = subprocess.Popen(["sleep", "0.2"])
    owner = owner_name(dead.pid)
    dead.wait()
    leftover = tuple(base / owner / "leftover" for base in support.bases)
    for directory in leftover:
        directory.mkdir(parents=True)
    stray, ours = f"100.{secrets.randbelow(10**9)}", f"100.{secrets.randbelow(10**9)}"
    start_in(tuple(d / "cgroup.procs" for d in leftover), stray)
    start_in(run_cgroup.procs_files, ours)

    reaped = reap_cgroups(support)

    assert reaped >= 1
    assert alive_with(stray) == []
    assert not any(d.parent.exists() for d in leftover)
    assert len(alive_with(ours)) == 2 and all(d.exists() for d in run_cgroup.dirs)
