"""What the reliability scenarios share: the processes they drive, a loopback TCP proxy, sizes,
and the ledger count that every scenario ends with.

Processes: ``SimulatorProcess`` (``tests/support/simulator.py``) is the provider; ``ServiceProcess``
(``tests/support/service.py``) is the service under test, serving the real app and making tracked
calls in its own process. Both are children of the test, on loopback, with every wait bounded.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import queue
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Engine, make_url

from app.budgets.guard import DatabaseBudgetGuard
from app.core.config import Settings
from app.core.db import create_db_engine
from app.models import (
    BudgetCounter,
    BudgetReservation,
    LLMUsage,
    UsageRollupDaily,
    UsageRollupDailyOverall,
)
from app.tracking.pricing import PriceBook
from tests.support import service as rel_service

HERE = Path(__file__).resolve().parent
BACKEND_DIR = HERE.parents[1]
START_SECONDS = 60.0
COMMAND_SECONDS = 120.0
STOP_SECONDS = 60.0

FULL = os.environ.get("ASA_RELIABILITY_FULL") == "1"
# SQLITE_BUSY_TIMEOUT_SECONDS of the services that meet a locked SQLite file: while it is locked,
# a call waits this long several times (reservation, write, settlement) before its row is spooled.
SQLITE_BUSY_TIMEOUT_SECONDS = 0.25


def size(ci: int | float, full: int | float) -> Any:
    """The CI size of a scenario, or its full size when ``ASA_RELIABILITY_FULL=1``."""
    return full if FULL else ci


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def rss_kib(pid: int) -> int:
    """Resident set size of a process, KiB (``VmRSS`` of ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError(f"no VmRSS for {pid}")


def base_env(tmp_path: Path) -> dict[str, str]:
    """A clean environment: nothing inherited but PATH, the backend on PYTHONPATH."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "PYTHONPATH": str(BACKEND_DIR),
        "PYTHONUNBUFFERED": "1",
    }


class _Child:
    """A child process speaking JSON lines on stdin/stdout; stderr goes to a log file."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.log_path = log
        self._log = log.open("ab")
        self.process = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    @property
    def pid(self) -> int:
        return self.process.pid

    def read(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                message: dict[str, Any] = json.loads(self.lines.get(timeout=0.1))
                return message
            except queue.Empty:
                if self.process.poll() is not None and self.lines.empty():
                    break
        raise RuntimeError(f"{self.log_path.name}: no answer\n{self.log_tail()}")

    def send(self, command: dict[str, Any], timeout: float = COMMAND_SECONDS) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self.read(timeout)

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_SECONDS)
        self._close()

    def _close(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        self._log.close()


# -- the provider --------------------------------------------------------------------------------


class SimulatorProcess(_Child):
    """The simulator in its own process; ``stats()`` is ``GET /sim/stats``."""

    def __init__(self, tmp_path: Path, config: dict[str, Any]) -> None:
        super().__init__(
            [sys.executable, str(HERE / "simulator.py"), json.dumps(config)],
            base_env(tmp_path),
            tmp_path,
            tmp_path / "simulator.log",
        )
        ready = self.read(START_SECONDS)
        self.url = f"http://127.0.0.1:{ready['port']}"
        self.base_url = f"{self.url}/v1"
        self.http = httpx.Client(
            base_url=self.url,
            timeout=30,
            headers={"Authorization": f"Bearer {ready['control_token']}"},  # opens /sim/*
        )

    def stats(self) -> dict[str, Any]:
        answer: dict[str, Any] = self.http.get("/sim/stats").raise_for_status().json()
        return answer

    def reset(self) -> None:
        self.http.post("/sim/reset").raise_for_status()

    def scripts(self, rules: list[dict[str, Any]]) -> None:
        self.http.post("/sim/scripts", json=rules).raise_for_status()

    def stop(self) -> None:
        self.http.close()
        self._close_stdin_and_wait()

    def _close_stdin_and_wait(self) -> None:
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
            self.process.wait(timeout=STOP_SECONDS)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


# -- the service ---------------------------------------------------------------------------------


FORKSERVER_CTX: Any = None


def forkserver() -> Any:
    """A multiprocessing forkserver that has imported the application once for the session.

    Importing the app costs seconds of CPU (the openai SDK's types, mostly); each service start
    forks from this already-importing process instead, as gunicorn's ``preload_app`` does.
    """
    global FORKSERVER_CTX
    if FORKSERVER_CTX is None:
        ctx = multiprocessing.get_context("forkserver")
        # Python 3.11's forkserver ignores the sys.path it is given: preload what is installed.
        ctx.set_forkserver_preload(["app.main", "app.core.migrations", "alembic.command"])
        FORKSERVER_CTX = ctx
    return FORKSERVER_CTX


class ServiceProcess:
    """``rel_service.serve``: the real app served on loopback, plus the call stream."""

    def __init__(self, tmp_path: Path, env: dict[str, str], call_log: Path, name: str) -> None:
        ctx = forkserver()
        self.log_path = tmp_path / f"{name}.log"
        self.call_log = call_log
        self._conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(
            target=rel_service.serve,
            args=(env, str(tmp_path), str(self.log_path), str(call_log), child_conn),
            name=f"asa-{name}",
            daemon=True,
        )
        self.process.start()
        child_conn.close()
        ready = self.read(START_SECONDS)
        if ready.get("event") != "ready":
            raise RuntimeError(f"service did not start: {ready}\n{self.log_tail()}")
        self.pid: int = ready["pid"]
        self.port: int = ready["port"]
        self.url = f"http://127.0.0.1:{self.port}"

    def read(self, timeout: float) -> dict[str, Any]:
        try:
            if self._conn.poll(timeout):
                message: dict[str, Any] = self._conn.recv()
                return message
        except (EOFError, OSError):
            pass
        raise RuntimeError(f"{self.log_path.name}: no answer\n{self.log_tail()}")

    def send(self, command: dict[str, Any], timeout: float = COMMAND_SECONDS) -> dict[str, Any]:
        self._conn.send(command)
        return self.read(timeout)

    def log_tail(self, chars: int = 4000) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def stream(self, prefix: str, lanes: dict[str, int], **options: Any) -> None:
        self.send({"op": "stream", "prefix": prefix, "lanes": lanes, **options})

    def drain(self) -> dict[str, int]:
        outcomes: dict[str, int] = self.send({"op": "drain"})["outcomes"]
        return outcomes

    def returned(self) -> int:
        """Calls returned to their caller so far (answered by the serving process)."""
        outcomes = self.send({"op": "count"})["outcomes"]
        return int(sum(outcomes.values()))

    def calls(self, calls: list[dict[str, Any]], concurrency: int = 8) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = self.send(
            {"op": "calls", "calls": calls, "concurrency": concurrency}
        )["results"]
        return results

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def _wait(self) -> int:
        self.process.join(STOP_SECONDS)
        if self.process.exitcode is None:
            raise RuntimeError(f"{self.log_path.name}: did not exit\n{self.log_tail()}")
        self._conn.close()
        return int(self.process.exitcode)

    def terminate(self) -> int:
        """SIGTERM, then wait for the graceful shutdown; the exit code."""
        os.kill(self.pid, signal.SIGTERM)
        return self._wait()

    def sigkill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self._wait()

    def stop(self) -> int:
        """The ``stop`` command: the same graceful shutdown as SIGTERM, without the signal."""
        self._conn.send({"op": "stop"})
        return self._wait()

    def kill(self) -> None:
        if self.process.exitcode is None and self.process.is_alive():
            self.process.kill()
            self.process.join(STOP_SECONDS)
        self._conn.close()


def service_env(
    tmp_path: Path, database_url: str, sim: SimulatorProcess, **settings: Any
) -> dict[str, str]:
    """The service's environment: a database, a spool, the simulator as its provider."""
    env = base_env(tmp_path)
    env.update(
        {
            "DATABASE_URL": database_url,
            "SPOOL_DIR": str(tmp_path / "spool"),
            "OPENAI_BASE_URL": sim.base_url,
            "OPENAI_API_KEY": "sk-reliability-test-0000",
            "EXAMPLES_DIR": str(tmp_path / "examples"),
            "WORKSPACE_ROOT": str(tmp_path / "workspaces"),
            "SPOOL_REPLAY_INTERVAL_SECONDS": "0.5",
        }
    )
    env.update({name.upper(): str(value) for name, value in settings.items()})
    return env


def read_call_log(path: Path) -> list[dict[str, Any]]:
    """Every call the service's callers saw return (a torn last line is a call never logged)."""
    entries = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
    return entries


# -- the database, unreachable on demand -----------------------------------------------------------


class TcpProxy:
    """A loopback TCP proxy to a server; ``pause()`` makes the server unreachable.

    Paused, the listening socket is closed (new connections are refused, as when PostgreSQL is
    stopped) and every open connection is reset. ``resume()`` listens on the same port again.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self._target = (target_host, target_port)
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self.port = 0

    def start(self) -> TcpProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.settimeout(0.05)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._stop.clear()
        self._acceptor = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._acceptor.start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()
        listener.close()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                self._drop(sock)

    def _drop(self, sock: socket.socket, reset: bool = False) -> None:
        with self._lock:
            self._sockets.discard(sock)
        try:
            if reset:  # RST, as a server that died would leave its peers
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def pause(self) -> None:
        self._stop.set()
        if self._acceptor is not None:
            self._acceptor.join(timeout=5)
        with self._lock:
            open_sockets = list(self._sockets)
        for sock in open_sockets:
            self._drop(sock, reset=True)

    def resume(self) -> None:
        self.start()

    def close(self) -> None:
        self.pause()


class DatabaseOutage:
    """Makes the service's database unavailable, then available again."""

    service_url: str

    def begin(self) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.end()


class PostgresOutage(DatabaseOutage):
    """PostgreSQL as if stopped: the service reaches it through a ``TcpProxy`` that is paused."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self.proxy = TcpProxy(parsed.port or 5432, parsed.host or "127.0.0.1").start()
        self.service_url = parsed.set(host="127.0.0.1", port=self.proxy.port).render_as_string(
            hide_password=False
        )
        self._down = False

    def begin(self) -> None:
        self.proxy.pause()
        self._down = True

    def end(self) -> None:
        if self._down:
            self.proxy.resume()
            self._down = False

    def close(self) -> None:
        self.proxy.close()


class SqliteOutage(DatabaseOutage):
    """The SQLite file locked by an exclusive transaction held by another process (this one)."""

    def __init__(self, url: str) -> None:
        self.service_url = url
        self._path = make_url(url).database or ""
        self._holder: sqlite3.Connection | None = None

    def begin(self) -> None:
        holder = sqlite3.connect(self._path, isolation_level=None, timeout=30)
        holder.execute("BEGIN EXCLUSIVE")
        self._holder = holder

    def end(self) -> None:
        if self._holder is not None:
            self._holder.execute("ROLLBACK")
            self._holder.close()
            self._holder = None


def spooled_rows(spool_dir: Path) -> int:
    """Rows waiting in a service's spool (complete lines of its JSONL files)."""
    if not spool_dir.is_dir():
        return 0
    total = 0
    for path in spool_dir.glob("spool-*.jsonl"):
        try:
            total += path.read_bytes().count(b"\n")
        except FileNotFoundError:
            continue
    return total


# -- the ledger ------------------------------------------------------------------------------------


@dataclass
class LedgerCount:
    """Calls seen by their callers (the call log) and by the provider, against ``llm_usage``."""

    returned: int
    returned_ok: int
    rows: int
    success_rows: int
    lost: list[str] = field(default_factory=list)  # returned calls without a row
    duplicated: list[str] = field(default_factory=list)  # keys with more than one row
    unknown_ids: list[str] = field(default_factory=list)  # received ids the provider never sent
    rollup_requests: int = 0
    overall_requests: int = 0
    sim_succeeded: int = 0
    sim_requests: int = 0
    attempts: int = 0

    def figures(self) -> dict[str, Any]:
        return {k: (len(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}


class Ledger:
    """Read-only queries on the service's database, from the test process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = (
            create_db_engine(url)
            if url.startswith("sqlite")
            else create_engine(url, pool_size=2, max_overflow=2)
        )

    def close(self) -> None:
        self.engine.dispose()

    def rows_by_key(self) -> Counter[str]:
        with self.engine.connect() as conn:
            return Counter(k for (k,) in conn.execute(select(LLMUsage.task_id)) if k)

    def row_count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(LLMUsage)) or 0)

    def rows(self) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(LLMUsage)))

    def open_reservations(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(BudgetReservation)) or 0)

    def reserved_pico(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.scalar(select(func.sum(BudgetCounter.reserved_pico_usd))) or 0)

    def sweep_expired_reservations(self) -> int:
        """Run the budget guard's sweep as it would run once the reservation TTL has passed."""
        settings = Settings(_env_file=None, database_url=self.url)  # type: ignore[call-arg]
        guard = DatabaseBudgetGuard(self.engine, settings, PriceBook({}))
        later = datetime.now(UTC) + timedelta(seconds=settings.budget_reservation_ttl_seconds + 1)
        return guard.sweep_expired(now=later)

    def counter(self, scope: str, subject: str = "") -> tuple[int, int]:
        """(spent, reserved) picodollars of a scope summed over its windows."""
        with self.engine.connect() as conn:
            spent, reserved = conn.execute(
                select(
                    func.coalesce(func.sum(BudgetCounter.spent_pico_usd), 0),
                    func.coalesce(func.sum(BudgetCounter.reserved_pico_usd), 0),
                ).where(BudgetCounter.scope == scope, BudgetCounter.subject_id == subject)
            ).one()
        return int(spent), int(reserved)

    def count(
        self, entries: list[dict[str, Any]], sim: dict[str, Any] | None = None
    ) -> LedgerCount:
        """Match the call log (and the provider's counters) against the rows."""
        by_key = self.rows_by_key()
        with self.engine.connect() as conn:
            rows = int(conn.scalar(select(func.count()).select_from(LLMUsage)) or 0)
            success = int(
                conn.scalar(
                    select(func.count()).select_from(LLMUsage).where(LLMUsage.status == "success")
                )
                or 0
            )
            attempts = int(conn.scalar(select(func.sum(LLMUsage.attempts))) or 0)
            rollup = int(conn.scalar(select(func.sum(UsageRollupDaily.requests))) or 0)
            overall = int(conn.scalar(select(func.sum(UsageRollupDailyOverall.requests))) or 0)
        sim_ids = set(sim["response_ids"]) if sim else set()
        return LedgerCount(
            returned=len(entries),
            returned_ok=sum(1 for e in entries if e["ok"]),
            rows=rows,
            success_rows=success,
            lost=[e["key"] for e in entries if by_key[e["key"]] == 0],
            duplicated=[k for k, n in by_key.items() if n > 1],
            unknown_ids=[e["rid"] for e in entries if sim and e["ok"] and e["rid"] not in sim_ids],
            rollup_requests=rollup,
            overall_requests=overall,
            sim_succeeded=sim["succeeded"] if sim else 0,
            sim_requests=sim["requests"] if sim else 0,
            attempts=attempts,
        )
