"""Workspaces, clones of untrusted repositories and sandboxed commands, with real git and processes.

The sandbox (``app/sandbox/runner.py``) is tested here too: it exists to serve the workspace.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.sandbox.runner import Isolation, build_child_env
from app.sandbox.workspace import (
    ClonedRepository,
    CloneError,
    InvalidGitRef,
    InvalidRepoURL,
    InvalidTestCommand,
    Workspace,
    clone_repository,
    detect_isolation,
    parse_test_command,
    run_sandboxed,
    validate_git_ref,
    validate_repo_url,
)

# The interpreter itself, not the virtual environment's link to it: the sandbox sees the
# interpreter's installation but never the service's virtual environment.
PY = os.path.realpath(sys.executable)


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=T", "-c", "user.email=t@example.com", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return done.stdout.strip()


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A repository with two commits on main, a tag on the first and a feature branch."""
    repo = tmp_path / "source"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "a.txt").write_text("one\n")
    git(repo, "add", "a.txt")
    git(repo, "commit", "-q", "-m", "first")
    first = git(repo, "rev-parse", "HEAD")
    git(repo, "tag", "v1")
    (repo / "a.txt").write_text("two\n")
    git(repo, "commit", "-q", "-am", "second")
    second = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "-b", "feature")
    (repo / "b.txt").write_text("feature\n")
    git(repo, "add", "b.txt")
    git(repo, "commit", "-q", "-m", "feature")
    feature = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "main")
    return repo, {"first": first, "second": second, "feature": feature}


def clone(
    url: str, dest: Path, ref: str | None = None, *, max_size_mb: float = 50
) -> ClonedRepository:
    return clone_repository(url, dest, ref, timeout_s=30, max_size_mb=max_size_mb)


def is_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie waiting for its reaper counts as dead."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def gone(token: str, timeout_s: float = 5.0) -> bool:
    """True once no live process has ``token`` in its command line (SIGKILL is asynchronous)."""
    deadline = time.monotonic() + timeout_s
    while processes_with(token):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def processes_with(token: str) -> list[int]:
    """Live processes whose command line contains ``token``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if token.encode() in cmdline and is_alive(int(entry.name)):
                found.append(int(entry.name))
    return found


# --- repository URLs and refs -----------------------------------------------------------------


def test_local_path_file_url_and_https_are_accepted(source: tuple[Path, dict[str, str]]) -> None:
    repo, _ = source

    assert validate_repo_url(str(repo)) == str(repo)
    assert validate_repo_url(f"file://{repo}") == f"file://{repo}"
    assert validate_repo_url("https://github.com/psf/requests.git")
    assert validate_repo_url("https://git.example.com:8443/team/repo")


HOSTILE_URLS = [
    ("ext::sh -c touch% {marker}", "whitespace"),
    ("ext::sh%20-c%20touch%20{marker}", "transport"),
    ("--upload-pack=touch%20{marker}", "option"),
    ("-oProxyCommand=touch%20{marker}", "option"),
    ("fd::17", "transport"),
    ("../../etc", "must be absolute"),
    ("./relative/repo", "must be absolute"),
    ("http://example.com/repo.git", "http:// URLs are refused"),
    ("git://example.com/repo.git", "git:// URLs are refused"),
    ("ssh://-oProxyCommand=touch%20{marker}/x", "ssh:// URLs are refused"),
    ("example.com:team/repo.git", "scp-style"),
    ("https://user:pass@example.com/repo.git", "credentials"),
    ("https://token@example.com/repo.git", "credentials"),
    ("https://example.com/repo.git?upload-pack=x", "query"),
    ("https:///no-host", "host name"),
    ("https://example.com:99999/repo.git", "port"),
    ("https://example.com/repo.git\n", "whitespace"),
    ("https://example.com/\x00repo.git", "control"),
    ("https://example.com/\u202erepo.git", "control"),
    ("file:///etc/../tmp", "without '..'"),
    ("file://remote-host/srv/repo.git", "local path"),
    ("file:///tmp/repo%2e%2e", "%-escapes"),
    ("/etc", "not a git repository"),
    ("", "empty"),
]


@pytest.mark.parametrize(("template", "reason"), HOSTILE_URLS)
def test_hostile_repo_urls_are_refused_and_nothing_runs(
    tmp_path: Path, template: str, reason: str
) -> None:
    marker = tmp_path / "pwned"
    url = template.format(marker=marker)
    dest = tmp_path / "clone"

    with pytest.raises(InvalidRepoURL, match=re.escape(reason)):
        validate_repo_url(url)
    with pytest.raises(InvalidRepoURL):
        clone(url, dest)

    assert not marker.exists()
    assert not dest.exists()


def test_ext_transport_would_run_a_command_if_git_were_allowed_to(tmp_path: Path) -> None:
    # The threat the URL checks exist for, shown with git's own protection switched off.
    marker = tmp_path / "pwned"
    subprocess.run(
        ["git", "-c", "protocol.ext.allow=always", "clone", f"ext::sh -c touch% {marker}", "x"],
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
        check=False,
    )

    assert marker.exists()


def test_local_repositories_can_be_refused(source: tuple[Path, dict[str, str]]) -> None:
    repo, _ = source

    with pytest.raises(InvalidRepoURL, match="not accepted here"):
        validate_repo_url(str(repo), allow_local=False)
    with pytest.raises(InvalidRepoURL, match="not accepted here"):
        validate_repo_url(f"file://{repo}", allow_local=False)


@pytest.mark.parametrize(
    "ref",
    ["", "-b", "--upload-pack=x", "a..b", "HEAD~1", "main@{1}", "x y", "x/", "x.lock", "/x", ".x"],
)
def test_hostile_or_malformed_refs_are_refused(ref: str) -> None:
    with pytest.raises(InvalidGitRef):
        validate_git_ref(ref)


@pytest.mark.parametrize("ref", ["main", "feature/login-fix", "v1.2.3", "1a2b3c4", "release_2"])
def test_usual_refs_are_accepted(ref: str) -> None:
    assert validate_git_ref(ref) == ref


# --- cloning ----------------------------------------------------------------------------------


def test_clone_by_path_checks_out_the_default_branch(
    source: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    repo, shas = source

    cloned = clone(str(repo), tmp_path / "clone")

    assert cloned.commit == shas["second"]
    assert (cloned.path / "a.txt").read_text() == "two\n"
    assert not (cloned.path / "b.txt").exists()
    assert git(cloned.path, "symbolic-ref", "--short", "HEAD") == "main"
    assert git(cloned.path, "status", "--porcelain") == ""
    assert cloned.size_bytes > 0


def test_clone_by_file_url(source: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    repo, shas = source

    cloned = clone(f"file://{repo}", tmp_path / "clone")

    assert cloned.commit == shas["second"]


def test_clone_checks_out_a_branch(source: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    repo, shas = source

    cloned = clone(str(repo), tmp_path / "clone", "feature")

    assert cloned.commit == shas["feature"]
    assert (cloned.path / "b.txt").read_text() == "feature\n"
    assert git(cloned.path, "symbolic-ref", "--short", "HEAD") == "feature"


@pytest.mark.parametrize("which", ["tag", "sha", "short sha"])
def test_clone_checks_out_a_tag_or_a_commit(
    source: tuple[Path, dict[str, str]], tmp_path: Path, which: str
) -> None:
    repo, shas = source
    ref = {"tag": "v1", "sha": shas["first"], "short sha": shas["first"][:8]}[which]

    cloned = clone(str(repo), tmp_path / "clone", ref)

    assert cloned.commit == shas["first"]
    assert (cloned.path / "a.txt").read_text() == "one\n"


def test_unknown_ref_fails_and_leaves_no_clone(
    source: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    repo, _ = source
    dest = tmp_path / "clone"

    with pytest.raises(CloneError, match="no branch, tag or commit named 'nope'"):
        clone(str(repo), dest, "nope")

    assert not dest.exists()


def test_clone_over_the_size_limit_is_deleted(
    source: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    repo, _ = source
    (repo / "big.bin").write_bytes(os.urandom(2 * 1024 * 1024))  # incompressible
    git(repo, "add", "big.bin")
    git(repo, "commit", "-q", "-m", "big")
    dest = tmp_path / "clone"

    with pytest.raises(CloneError, match=r"over the 1\.0 MB limit"):
        clone(str(repo), dest, max_size_mb=1)

    assert not dest.exists()


def test_clone_into_a_non_empty_directory_is_refused(
    source: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    repo, _ = source
    dest = tmp_path / "clone"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine\n")

    with pytest.raises(CloneError, match="not an empty directory"):
        clone(str(repo), dest)

    assert (dest / "keep.txt").read_text() == "mine\n"


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A loopback TCP port that accepts connections and never answers (no TLS handshake)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


def test_clone_that_hangs_is_killed_at_the_deadline(silent_server: int, tmp_path: Path) -> None:
    dest = tmp_path / "clone"

    with pytest.raises(CloneError, match="timed out"):
        clone_repository(
            f"https://127.0.0.1:{silent_server}/repo.git",
            dest,
            timeout_s=1,
            max_size_mb=10,
            # An administrator's task: loopback is allowed, and the reason is git's or ours.
            allow_private_hosts=True,
            report_git_output=True,
        )

    assert not dest.exists()


# --- the workspace directory ------------------------------------------------------------------


def test_workspace_is_private_and_removed_on_exit(tmp_path: Path) -> None:
    with Workspace(tmp_path / "jobs") as workspace:
        path = workspace.path
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
        assert path.parent == tmp_path / "jobs"
        assert workspace.home_dir.is_dir()
        (path / "scratch.txt").write_text("x")

    assert not path.exists()


def test_workspace_is_removed_even_when_its_contents_are_read_only(tmp_path: Path) -> None:
    with Workspace(tmp_path) as workspace:
        locked = workspace.path / "locked"
        (locked / "inner").mkdir(parents=True)
        (locked / "inner" / "f.txt").write_text("x")
        (locked / "inner").chmod(0o500)
        locked.chmod(0o500)
        path = workspace.path

    assert not path.exists()


def test_workspace_kept_on_request(tmp_path: Path) -> None:
    with Workspace(tmp_path, keep=True) as workspace:
        path = workspace.path

    assert path.is_dir()


# --- test commands ----------------------------------------------------------------------------


def test_test_command_is_split_into_an_argument_vector() -> None:
    assert parse_test_command("pytest -q 'tests/test a.py' -k \"add or mul\"") == [
        "pytest",
        "-q",
        "tests/test a.py",
        "-k",
        "add or mul",
    ]
    assert parse_test_command(["npm", "test"]) == ["npm", "test"]
    assert parse_test_command("sh -c 'make test && echo ok'") == [
        "sh",
        "-c",
        "make test && echo ok",
    ]


@pytest.mark.parametrize(
    "command",
    ["", "   ", [], [""], "pytest 'unterminated", "pytest && rm -rf /", "pytest | tee x", "a ; b"],
)
def test_unusable_test_commands_are_refused(command: str | list[str]) -> None:
    with pytest.raises(InvalidTestCommand):
        parse_test_command(command)


# --- sandboxed runs ---------------------------------------------------------------------------


def test_run_reports_exit_code_and_interleaved_output(tmp_path: Path) -> None:
    result = run_sandboxed(["sh", "-c", "echo out; echo err >&2; exit 3"], tmp_path, timeout_s=10)

    assert result.exit_code == 3
    assert result.output == "out\nerr\n"
    assert not result.timed_out
    assert not result.truncated


NO_NAMESPACES = Isolation(offline_prefix=None, online_prefix=())


@pytest.fixture(params=["detected", "process-group-only"])
def isolation(request: pytest.FixtureRequest) -> Isolation:
    """The isolation this machine offers, and none at all: killing the group must suffice."""
    return detect_isolation() if request.param == "detected" else NO_NAMESPACES


def test_hanging_command_is_killed_with_its_grandchildren(
    tmp_path: Path, isolation: Isolation
) -> None:
    token = f"1000.{secrets.randbelow(10**9)}"
    # The grandchild shell becomes `sleep` under the same PID, in a process group of its own.
    script = f"sh -c 'exec sleep {token}' & sleep 1000"

    result = run_sandboxed(["sh", "-c", script], tmp_path, timeout_s=1.5, isolation=isolation)

    assert result.timed_out
    assert result.exit_code == -9
    assert gone(token)


def test_forking_command_leaves_no_process_behind(tmp_path: Path, isolation: Isolation) -> None:
    token = f"100.{secrets.randbelow(10**9)}"
    script = f"sleep {token} & sleep {token}"

    result = run_sandboxed(["sh", "-c", script], tmp_path, timeout_s=1, isolation=isolation)

    assert result.timed_out
    assert gone(token)


def test_background_process_does_not_hold_the_run_open(
    tmp_path: Path, isolation: Isolation
) -> None:
    token = f"100.{secrets.randbelow(10**9)}"
    script = f"sleep {token} & echo done"

    result = run_sandboxed(["sh", "-c", script], tmp_path, timeout_s=20, isolation=isolation)

    assert not result.timed_out
    assert result.exit_code == 0
    assert result.output == "done\n"
    assert gone(token)


@pytest.mark.skipif(
    detect_isolation().online_prefix == (), reason="PID namespaces unavailable here"
)
def test_process_that_escaped_the_group_dies_with_the_pid_namespace(tmp_path: Path) -> None:
    started = tmp_path / "daemon.started"
    token = f"1000.{secrets.randbelow(10**9)}"
    daemon = f"import time; open({str(started)!r}, 'w').close(); time.sleep({token})"
    starter = (
        "import subprocess, sys, time, os; "
        f"subprocess.Popen([sys.executable, '-c', {daemon!r}], start_new_session=True); "
        f"[time.sleep(0.02) for _ in range(200) if not os.path.exists({str(started)!r})]"
    )

    result = run_sandboxed([PY, "-c", starter], tmp_path, timeout_s=20)

    assert result.exit_code == 0, result.output
    assert started.exists()
    assert gone(token)


def test_output_flood_is_capped_head_and_tail(tmp_path: Path) -> None:
    cap = 64 * 1024
    script = "echo FIRST; yes | head -c 50000000; echo; echo LAST"

    result = run_sandboxed(["sh", "-c", script], tmp_path, timeout_s=20, max_output_bytes=cap)

    assert result.exit_code == 0
    assert result.truncated
    assert result.output_bytes > 50_000_000
    assert len(result.output) <= cap
    assert result.output.startswith("FIRST\n")
    assert result.output.endswith("LAST\n")
    assert "bytes of output omitted" in result.output


MEASURE_FLOOD = """
import re, sys
from pathlib import Path
from app.sandbox.runner import run_sandboxed
result = run_sandboxed(
    ["sh", "-c", "yes | head -c 100000000"], Path(sys.argv[1]), timeout_s=60, max_output_bytes=65536
)
assert result.output_bytes == 100_000_000, result
status = Path("/proc/self/status").read_text()
print(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1))
"""


def test_output_flood_is_read_in_bounded_memory(tmp_path: Path) -> None:
    # A fresh interpreter, so that its peak RSS measures this run alone. VmHWM, not ru_maxrss:
    # the latter carries over the high-water mark of the forked copy of this (big) process.
    backend = Path(__file__).resolve().parents[2]
    measured = subprocess.run(
        [sys.executable, "-c", MEASURE_FLOOD, str(tmp_path)],
        cwd=backend,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    peak_mib = int(measured.stdout) / 1024
    assert peak_mib < 64, f"reading 100 MB of output peaked at {peak_mib:.0f} MiB"


def test_secrets_in_the_service_environment_never_reach_the_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = f"canary-{secrets.token_hex(8)}"
    monkeypatch.setenv("OPENAI_API_KEY", canary)
    monkeypatch.setenv("DATABASE_URL", f"postgresql://u:{canary}@db/x")
    monkeypatch.setenv("ASA_SOMETHING", canary)
    home = tmp_path / "home"
    home.mkdir()

    result = run_sandboxed(["env"], tmp_path, timeout_s=10, home=home)

    assert result.exit_code == 0
    assert canary not in result.output
    assert f"HOME={home}\n" in result.output
    assert "PATH=" in result.output


def test_secret_names_cannot_be_let_through(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-canary")
    monkeypatch.setenv("SERVICE_LOGIN", "configured-secret")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:1/simple")

    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        build_child_env(tmp_path, env_allow=["OPENAI_API_KEY"])
    with pytest.raises(ValueError, match="SERVICE_LOGIN"):
        build_child_env(tmp_path, env_allow=["SERVICE_LOGIN"], secret_names=["SERVICE_LOGIN"])
    with pytest.raises(ValueError, match="GITHUB_TOKEN"):
        build_child_env(tmp_path, extra_env={"GITHUB_TOKEN": "x"})
    env = build_child_env(tmp_path, env_allow=["PIP_INDEX_URL", "NOT_SET_ANYWHERE"])
    assert env["PIP_INDEX_URL"] == "http://127.0.0.1:1/simple"
    assert "NOT_SET_ANYWHERE" not in env


CONNECT = (
    "import socket, sys; "
    "socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=3).close(); "
    "print('connected')"
)


@pytest.fixture
def listener() -> Iterator[int]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


def test_network_is_cut_off_when_isolation_is_available(listener: int, tmp_path: Path) -> None:
    if detect_isolation().offline_prefix is None:
        pytest.skip("network namespaces unavailable here")

    result = run_sandboxed([PY, "-c", CONNECT, str(listener)], tmp_path, timeout_s=10)

    assert result.network_isolated
    assert result.exit_code != 0
    assert "connected" not in result.output


def test_network_is_reachable_when_allowed(listener: int, tmp_path: Path) -> None:
    result = run_sandboxed([PY, "-c", CONNECT, str(listener)], tmp_path, timeout_s=10, network=True)

    assert not result.network_isolated
    assert result.exit_code == 0, result.output
    assert result.output == "connected\n"


def test_cpu_limit_stops_a_busy_loop(tmp_path: Path) -> None:
    result = run_sandboxed([PY, "-c", "while True: pass"], tmp_path, timeout_s=20, cpu_seconds=1)

    assert not result.timed_out
    assert result.exit_code != 0


ALLOCATE = "b = bytearray(1024 * 1024 * 1024); print('allocated')"


@pytest.mark.parametrize("limited_by", [None, NO_NAMESPACES], ids=["detected", "no-namespaces"])
def test_memory_limit_stops_a_large_allocation(
    tmp_path: Path, limited_by: Isolation | None
) -> None:
    result = run_sandboxed(
        [PY, "-c", ALLOCATE], tmp_path, timeout_s=20, memory_mb=256, isolation=limited_by
    )

    assert result.exit_code != 0
    assert "MemoryError" in result.output


def test_missing_executable_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        run_sandboxed(["definitely-not-a-command"], tmp_path, timeout_s=5, isolation=NO_NAMESPACES)
