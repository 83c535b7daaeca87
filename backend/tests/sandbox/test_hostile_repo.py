"""A hostile repository's test command tries every escape of the red-team report (2026-11-30):
each attempt fails, and the host's data is unchanged afterwards.

The commands run as the orchestrator runs a test command: on a private copy of the repository,
with the task's caps, under the sandbox this machine offers (bubblewrap; the CI installs it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.access.principal import Principal
from app.core.config import BACKEND_DIR
from app.core.runtime import Runtime
from app.models import ApiKey, Task
from app.sandbox.bwrap import SandboxPolicy
from app.sandbox.runner import RunResult, detect_isolation, run_sandboxed
from app.sandbox.workspace import Workspace
from app.schemas.tasks import TaskSubmitRequest
from app.tasks import store as task_store
from app.tasks.orchestrator import Orchestrator

# The interpreter's own installation: the sandbox never sees the service's virtual environment.
PY = os.path.realpath(sys.executable)
POLICY = SandboxPolicy(tmp_mb=16, disk_mb=32, max_processes=64)
MEMORY_MB = 256

pytestmark = pytest.mark.skipif(
    detect_isolation().bwrap is None,
    reason=f"no working bubblewrap here: {detect_isolation().bwrap_missing}",
)
needs_cgroups = pytest.mark.skipif(
    detect_isolation().cgroups is None,
    reason=f"no cgroups here: {detect_isolation().cgroups_missing}",
)

# Runs each named attempt and prints {name: ["ok", what] | ["denied", why]} as its last line.
ATTEMPTS = """
import json, os, socket, sqlite3, sys
results = {}
def attempt(name, fn):
    try:
        results[name] = ["ok", repr(fn())[:300]]
    except Exception as exc:
        results[name] = ["denied", type(exc).__name__]
"""
REPORT = "\nprint(json.dumps(results))\n"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def processes_with(token: str) -> list[int]:
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


def sleeping(token: str) -> bool:
    """Whether `sleep <token>` itself runs."""
    for pid in processes_with(token):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes() == f"sleep\0{token}\0".encode():
                return True
    return False


def gone(token: str, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while processes_with(token):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """The hostile repository's checkout, as the orchestrator has it in a workspace."""
    checkout = tmp_path / "workspace" / "repo"
    checkout.mkdir(parents=True)
    (checkout / "README").write_text("nothing to see\n")
    return checkout


def run_test_command(repo: Path, script: str, *args: str, timeout_s: float = 30) -> RunResult:
    """Run ``python -c script args`` as the orchestrator runs a test command."""
    return run_sandboxed(
        [PY, "-c", script, *args],
        repo,
        timeout_s=timeout_s,
        secret_names=["OPENAI_API_KEY", "DATABASE_URL"],
        cpu_seconds=60,
        memory_mb=MEMORY_MB,
        policy=POLICY,
        scratch_copy=True,
    )


def attempts(repo: Path, body: str, *args: str) -> dict[str, list[str]]:
    result = run_test_command(repo, ATTEMPTS + body + REPORT, *args)
    assert result.exit_code == 0, result.output
    assert result.sandbox == "bwrap"
    reported: dict[str, list[str]] = json.loads(result.output.strip().splitlines()[-1])
    return reported


def succeeded(results: dict[str, list[str]]) -> dict[str, str]:
    """The attempts that were not denied (what must stay empty)."""
    return {name: what for name, (verdict, what) in results.items() if verdict != "denied"}


# --- the service's data, code and secrets ------------------------------------------------------


def test_the_service_database_can_be_neither_read_nor_written(repo: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    database = data / "asa.db"
    with sqlite3.connect(database) as conn:
        conn.execute("CREATE TABLE api_keys (user_id TEXT, role TEXT)")
        conn.execute("INSERT INTO api_keys VALUES ('alice', 'user')")
    conn.close()
    before = sha256(database)

    results = attempts(
        repo,
        """
db = sys.argv[1]
attempt("read", lambda: open(db, "rb").read(100))
def mint_admin():
    conn = sqlite3.connect(f"file:{db}?mode=rw", uri=True)
    conn.execute("INSERT INTO api_keys VALUES ('mallory', 'admin')")
    conn.commit()
attempt("write", mint_admin)
attempt("list the data directory", lambda: os.listdir(os.path.dirname(db)))
attempt("list the service's data directory", lambda: os.listdir(sys.argv[2]))
""",
        str(database),
        str(BACKEND_DIR / "data"),
    )

    assert succeeded(results) == {}
    assert sha256(database) == before


def test_the_service_code_can_be_neither_read_nor_changed(repo: Path) -> None:
    planted = BACKEND_DIR / "app" / f"asa_probe_{secrets.token_hex(4)}.py"
    config = BACKEND_DIR / "app" / "core" / "config.py"
    before = sha256(config)
    try:
        results = attempts(
            repo,
            """
attempt("read", lambda: open(sys.argv[1]).read(100))
attempt("change", lambda: open(sys.argv[1], "a").write("# pwned"))
attempt("plant", lambda: open(sys.argv[2], "w").write("print('pwned')"))
""",
            str(config),
            str(planted),
        )
    finally:
        planted.unlink(missing_ok=True)

    assert succeeded(results) == {}
    assert sha256(config) == before


def test_the_services_environment_cannot_be_read_through_proc(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = f"sk-canary-{secrets.token_hex(8)}"
    monkeypatch.setenv("OPENAI_API_KEY", canary)
    monkeypatch.setenv("CANARY_PLAIN", canary)

    result = run_test_command(
        repo,
        """
import json, os, sys
found, pids = [], []
for pid in filter(str.isdigit, os.listdir("/proc")):
    pids.append(int(pid))
    try:
        if sys.argv[1].encode() in open(f"/proc/{pid}/environ", "rb").read():
            found.append(pid)
    except OSError:
        pass
print(json.dumps({"found": found, "pids": pids, "own": os.environ.get("CANARY_PLAIN")}))
""",
        canary,
    )

    seen = json.loads(result.output.strip().splitlines()[-1])
    assert seen["found"] == [] and seen["own"] is None
    assert os.getpid() not in seen["pids"] and max(seen["pids"]) < 100  # its own PID namespace


def test_another_tasks_workspace_is_invisible(repo: Path, tmp_path: Path) -> None:
    with Workspace(tmp_path / "workspaces") as other:
        secret = other.path / "repo" / "secret.txt"
        secret.parent.mkdir()
        secret.write_text("another user's code\n")

        results = attempts(
            repo,
            """
attempt("read", lambda: open(sys.argv[1]).read())
attempt("list", lambda: os.listdir(sys.argv[2]))
attempt("write", lambda: open(sys.argv[1], "w").write("overwritten"))
""",
            str(secret),
            str(other.path.parent),
        )

        assert succeeded(results) == {}
        assert secret.read_text() == "another user's code\n"


def test_the_host_accounts_and_root_home_are_invisible(repo: Path) -> None:
    home = Path.home()
    canary = home / f".asa-canary-{secrets.token_hex(4)}"
    planted = home / f".asa-planted-{secrets.token_hex(4)}"
    canary.write_text("the service user's secret\n")
    try:
        results = attempts(
            repo,
            """
attempt("read a file in the service's home", lambda: open(sys.argv[1]).read())
attempt("write in the service's home", lambda: open(sys.argv[2], "w").write("x"))
attempt("list /root", lambda: [n for n in os.listdir("/root") if n != ".pyenv"] or 1 / 0)
attempt("read /etc/shadow", lambda: open("/etc/shadow").read())
attempt("host accounts", lambda: [l for l in open("/etc/passwd") if "root" in l] or 1 / 0)
""",
            str(canary),
            str(planted),
        )
    finally:
        canary.unlink()
        planted.unlink(missing_ok=True)

    assert succeeded(results) == {}


@pytest.fixture
def host_sockets(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A unix socket in the host's /tmp and an abstract one (its name without the leading NUL),
    both listening."""
    path = tmp_path / "service.sock"
    abstract = f"asa-test-{secrets.token_hex(4)}"
    with socket.socket(socket.AF_UNIX) as on_disk, socket.socket(socket.AF_UNIX) as in_net:
        on_disk.bind(str(path))
        on_disk.listen(4)
        in_net.bind("\0" + abstract)
        in_net.listen(4)
        yield {"path": str(path), "abstract": abstract}


def test_unix_sockets_of_the_host_are_unreachable(repo: Path, host_sockets: dict[str, str]) -> None:
    results = attempts(
        repo,
        """
def connect(address):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        s.connect(address)
attempt("a socket in the host's /tmp", lambda: connect(sys.argv[1]))
attempt("an abstract socket", lambda: connect("\\0" + sys.argv[2]))
attempt("PostgreSQL's socket", lambda: connect("/var/run/postgresql/.s.PGSQL.5432"))
attempt("PostgreSQL's socket (/run)", lambda: connect("/run/postgresql/.s.PGSQL.5432"))
""",
        host_sockets["path"],
        host_sockets["abstract"],
    )

    assert succeeded(results) == {}


def test_the_command_runs_unprivileged_without_capabilities(repo: Path) -> None:
    result = run_test_command(
        repo,
        "import os; print(os.getuid(), os.getgid(), "
        "[l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')][0])",
    )

    assert result.output.split() == ["65534", "65534", "0000000000000000"]


# --- aggregate caps ---------------------------------------------------------------------------

FORK_BOMB = """
import subprocess, sys
children = []
try:
    while len(children) < 200:
        children.append(subprocess.Popen(["sleep", "30"]))
except OSError as exc:
    print("refused:", exc)
print("started", len(children))
"""


@needs_cgroups
def test_a_fork_bomb_is_held_at_the_process_cap(repo: Path) -> None:
    result = run_test_command(repo, FORK_BOMB)

    started = int(result.output.split("started")[-1])
    assert started < POLICY.max_processes  # 64 at once, this interpreter and bwrap included
    assert "processes" in result.limits_hit


MEMORY_BOMB = """
import subprocess, sys, time
HOLD = "b = bytearray(100 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('held', flush=True); "
HOLD += "import time; time.sleep(30)"
children = [
    subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE) for _ in range(4)
]
# Each child answers "held" once its 100 MiB are resident, or dies (the OOM killer) first; one
# that held may be killed later, for another. What counts is how many hold at the same time.
answers = [child.stdout.readline() for child in children]
time.sleep(0.5)
holding = sum(a == b"held\\n" and c.poll() is None for a, c in zip(answers, children))
for child in children:
    child.kill()
print("holding at once", holding)
"""


@needs_cgroups
def test_a_memory_bomb_is_held_at_the_aggregate_memory_cap(repo: Path) -> None:
    # Four processes of 100 MiB each: every one is under the per-process limit (256 MB).
    result = run_test_command(repo, MEMORY_BOMB)

    assert int(result.output.split("holding at once")[-1]) <= 2, result.output
    assert "memory" in result.limits_hit


DISK_FILLER = """
import json, os, sys
MiB = b"x" * 2**20
written = {}
for where in sys.argv[1:]:
    total = 0
    try:
        with open(os.path.join(where, "asa-filler-" + os.environ["TOKEN"]), "wb") as out:
            for _ in range(64):
                out.write(MiB)
                out.flush()
                total += 1
    except OSError as exc:
        pass
    written[where] = total
print(json.dumps(written))
"""


def test_a_disk_filler_is_held_at_its_quotas_and_leaves_nothing_behind(
    repo: Path, tmp_path: Path
) -> None:
    token = secrets.token_hex(6)
    places = [".", "/tmp", "/dev/shm", "/var/tmp", "/", "/usr", str(tmp_path), str(Path.home())]
    script = f"import os; os.environ['TOKEN'] = {token!r}\n" + DISK_FILLER

    result = run_test_command(repo, script, *places)

    written = json.loads(result.output.strip().splitlines()[-1])
    assert written["."] <= POLICY.disk_mb  # MiB
    assert written["/tmp"] <= POLICY.tmp_mb and written["/dev/shm"] <= POLICY.tmp_mb
    assert all(written[where] == 0 for where in places[3:]), written
    leftovers = [
        path
        for where in ["/tmp", "/dev/shm", "/var/tmp", str(tmp_path), str(Path.home()), str(repo)]
        for path in Path(where).glob(f"asa-filler-{token}")
    ]
    assert leftovers == []
    assert sorted(p.name for p in repo.iterdir()) == ["README"]


# --- processes that try to outlive the task ----------------------------------------------------


def test_an_orphan_that_left_the_session_dies_with_the_command(repo: Path) -> None:
    token = f"1000.{secrets.randbelow(10**9)}"
    orphan = (
        "import os, subprocess, sys, time\n"
        f"subprocess.Popen(['setsid', 'sh', '-c', 'sleep {token} & exit 0'])\n"
        "time.sleep(0.5)\n"
        "print('parent done')\n"
    )

    result = run_test_command(repo, orphan)

    assert result.exit_code == 0, result.output
    assert gone(token)


SERVICE = """
import sys
from pathlib import Path
from app.sandbox.runner import run_sandboxed
run_sandboxed(["sleep", sys.argv[2]], Path(sys.argv[1]), timeout_s=float(sys.argv[3]))
"""


def test_a_killed_service_takes_its_sandbox_with_it(repo: Path) -> None:
    token = f"600.{secrets.randbelow(10**9)}"
    service = subprocess.Popen(  # a stand-in for the service: runs a command, gets SIGKILL
        [sys.executable, "-c", SERVICE, str(repo), token, "600"], cwd=BACKEND_DIR
    )
    try:
        deadline = time.monotonic() + 20
        while not sleeping(token):  # the sandboxed command itself, not a launcher before it
            assert time.monotonic() < deadline and service.poll() is None, "never started"
            time.sleep(0.02)

        service.send_signal(signal.SIGKILL)
        service.wait(timeout=5)

        assert gone(token, timeout_s=3.0)
    finally:
        service.kill()


def test_a_service_killed_while_its_sandbox_starts_leaves_nothing_past_the_deadline(
    repo: Path,
) -> None:
    # Killed at once, while bubblewrap sets itself up (its own parent-death signal is not armed
    # yet): the command's own deadline, 2 s after the run's (1 s), still ends it.
    token = f"600.{secrets.randbelow(10**9)}"
    service = subprocess.Popen(
        [sys.executable, "-c", SERVICE, str(repo), token, "1"], cwd=BACKEND_DIR
    )
    try:
        deadline = time.monotonic() + 20
        while not set(processes_with(token)) - {service.pid}:  # anything it started
            assert time.monotonic() < deadline and service.poll() is None, "never started"
            time.sleep(0.001)

        service.send_signal(signal.SIGKILL)
        service.wait(timeout=5)

        assert gone(token, timeout_s=6.0)
    finally:
        service.kill()


# --- through the service: a task whose tests try to mint an admin key ---------------------------

MINT = """
import os, socket, sqlite3, sys
def attempt(name, fn):
    try:
        fn()
        print(name, "SUCCEEDED")
    except Exception as exc:
        print(name, "failed:", type(exc).__name__)
def mint():
    conn = sqlite3.connect(f"file:{sys.argv[1]}?mode=rw", uri=True)
    conn.execute(
        "INSERT INTO api_keys (id, user_id, role, prefix, key_hash, created_at) "
        "VALUES ('x', 'mallory', 'admin', 'x', 'x', '2026-11-30 00:00:00')"
    )
    conn.commit()
def postgres():
    with socket.socket(socket.AF_UNIX) as s:
        s.connect("/var/run/postgresql/.s.PGSQL.5432")
attempt("mint an admin key", mint)
attempt("reach PostgreSQL", postgres)
sys.exit(1)
"""


def test_a_users_task_cannot_mint_an_admin_key(runtime: Runtime, tmp_path: Path) -> None:
    checkout = tmp_path / "mint"
    checkout.mkdir()
    (checkout / "mint.py").write_text(MINT)
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "mint"]):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=checkout)
    url = runtime.settings.database_url
    database = url.removeprefix("sqlite:///") if url.startswith("sqlite") else "/no/such.db"
    command = f"{PY} mint.py {database}"
    request = TaskSubmitRequest(repo_url=str(checkout), bug_description="x", test_command=command)
    with Session(runtime.engine) as session, session.begin():
        task_id = task_store.create_task(
            session, Principal("bob", "user"), request, "gpt-4o-mini"
        ).id
    assert task_store.claim_next(runtime.engine, "w") == task_id

    Orchestrator(runtime, task_id, worker_id="w").run()

    with Session(runtime.engine) as session:
        task = session.get(Task, task_id)
        assert task is not None and task.tests_before is not None
        admins = session.scalar(select(func.count()).select_from(ApiKey))
    summary = json.loads(task.tests_before)["summary"]
    assert "mint an admin key failed" in summary and "reach PostgreSQL failed" in summary
    assert "SUCCEEDED" not in summary
    assert admins == 0
