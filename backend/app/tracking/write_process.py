"""The writer process: async callers' usage rows committed outside the service's GIL.

An event loop that makes LLM calls spends most of its CPU in the SDK's Python. When the
tracking thread (``DbWorker``) commits the rows in the same process, every SQLite or psycopg
call hands the GIL back and forth with the event loop, and the loop's calls slow down by more
than the write itself costs (issue 17: tracked async throughput 0.80x raw with the thread,
0.91x with the rows committed in another process). So each service process runs one writer
process beside it (``TRACKING_WRITER=process``, the default for a file or server database):

- The caller still waits for its row's commit: ``DbWorker.write`` hands the row and its budget
  settlement (the reservation, as data: ``Reservation.to_json``) to ``WriterProcess.submit``,
  which sends them over a Unix socket pair; the child commits every row that arrived together in
  one transaction (``DbWorker``'s batch code: ``writer.insert_new_usage``, the settlements by
  ``guard.settle_data``) and acknowledges each with its ``WriteOutcome``. What the settlements
  warned about (a soft limit crossed, an expired reservation) comes back with the
  acknowledgement and is announced here, where the service's metrics are.
- An event loop's call that a budget limit may apply to asks the child for its reservation too
  (``WriterProcess.reserve``, when the service enforces budgets: the child builds the same
  ``DatabaseBudgetGuard`` from the service's settings). The reservations that arrived together
  are taken in one transaction (``DatabaseBudgetGuard.reserve_requests``), before the rows of
  the same read, and each caller's loop gets its answer as the acknowledgements come: the
  ``Reservation`` taken (or found unneeded), or word that the tracking thread must decide (a
  refusal, which it decides again and records; an outage, which opens this process's breaker
  too, so the call pays one timeout, not two). The reservation's id is chosen by the caller: a
  child that dies before answering may have taken it, and the caller gives it back
  (``DatabaseBudgetGuard.give_back``) before the thread reserves again; a reservation taken for
  a caller that stopped waiting (cancelled: ``asyncio.wait_for``) is given back likewise.
  Taking them here frees the service's GIL of the reservation's SQL (issue 17: with every scope
  limited, tracked async throughput 0.88x raw with the thread reserving, 0.90x with the child).
- Nothing is lost or counted twice if the child dies: every row sent and not acknowledged is
  written again by the tracking thread, its settlement done only if the row is new (a row in
  the ledger was committed with its settlement: ``UsageWriter.write(also_if_new=True)``); the
  spool replays likewise (``app.tracking.spool``). The child is started again on a later write
  (after 1 s, doubling up to a minute while it keeps dying); meanwhile the thread writes.
- The child starts on the first write (until it says it is ready the thread writes), exits
  when the service closes the socket (after acknowledging everything it read) or when the
  service dies (the socket's end of file), ignores Ctrl-C (the service drains it), and is
  killed if it does not exit in time. A row the database cannot take goes to the same spool
  directory, which the service's replayer empties.
- The event loop that writes reads the acknowledgements itself (``add_reader`` on the socket)
  and resolves its callers' waiters where it reads them; the receiver thread reads them only
  when no running loop does (a thread's rows, a loop that ended, the service closing) and is
  the one that acts on the child's end. A thread waking per acknowledgement took the GIL from
  the loop and woke it again through its self-pipe: about a tenth of a millisecond of the loop's
  time per call (issue 17).
- Messages are pickles, exchanged only with our own child over a socket pair no other process
  holds; a row travels as ``UsageRecord.to_wire``, an acknowledgement as plain flags, a
  reservation as ``ReserveRequest`` and its answer as a ``Reservation`` or a word.

In-memory SQLite cannot be shared with another process, so there the thread writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import Engine, make_url

from app.observability import TRACKING_ERRORS, USAGE_SPOOL_PENDING, USAGE_SPOOLED
from app.tracking.db_worker import resolve_all
from app.tracking.record import UsageRecord
from app.tracking.writer import WriteOutcome

if TYPE_CHECKING:
    from app.budgets.guard import ReserveAnswer, ReserveRequest, Settled
    from app.core.config import Settings
    from app.tracking.db_worker import _Write

logger = logging.getLogger(__name__)

# The writer process's state: not started yet, starting, writing, stopped (waiting to start
# again), closed with the service.
ProcessState = Literal["idle", "starting", "up", "down", "closed"]

READY = "ready"
RESERVED = "reserved"  # a message of reservation answers: (RESERVED, [(seq, answer), ...])
LOST: Literal["lost"] = "lost"  # a reservation's answer when the child died before giving it
MAX_MESSAGE = 1 << 20  # a row bigger than this pickled is written by the thread
SOCKET_BUFFER = 4 << 20
ACKS_PER_MESSAGE = 64
LOOP_READS_PER_WAKE = 16  # ack messages a loop reads before it lets other callbacks run
LOOP_CHECK_SECONDS = 0.5  # how often a parked receiver thread checks that its loop still runs
MAX_IN_FLIGHT = 2048  # rows sent and not yet acknowledged; beyond, the thread writes
STOP_TIMEOUT_SECONDS = 30.0  # to drain on close before the child is killed
FIRST_RETRY_SECONDS = 1.0
LAST_RETRY_SECONDS = 60.0
BACKEND_ROOT = Path(__file__).resolve().parents[2]  # the directory holding the ``app`` package


@dataclass(frozen=True, slots=True)
class WriterConfig:
    """What the child needs to open the same database and spool as the service."""

    database_url: str
    sqlite_busy_timeout: float
    spool_dir: str
    # The service's settings when it enforces budgets: the child then also takes its event
    # loops' reservations (``DatabaseBudgetGuard.reserve_requests``).
    settings: Settings | None = None


def shareable(engine: Engine) -> bool:
    """True if another process can open the engine's database (not in-memory SQLite)."""
    url = engine.url
    if url.get_backend_name() != "sqlite":
        return True
    return bool(url.database) and url.database != ":memory:" and "mode=memory" not in str(url)


# -- messages -------------------------------------------------------------------------------
# A SOCK_SEQPACKET socket pair keeps messages whole: one pickle per send, sent entirely or not at
# all, one per receive. The service never blocks on a send (``MSG_DONTWAIT``: a child that has
# fallen behind makes the thread write the row instead); the child blocks on its sends, which the
# service always reads (on its event loop, or on the receiver thread when no loop does). Whole
# messages are also why two readers never split or repeat an acknowledgement.


def _encode(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _receive_message(sock: socket.socket, flags: int = 0) -> Any:
    """The next message (None at end of file or on a broken socket)."""
    try:
        data = sock.recv(MAX_MESSAGE, flags)
    except (BlockingIOError, InterruptedError):
        raise
    except OSError:
        return None
    if not data:
        return None
    return pickle.loads(data)  # noqa: S301 - only our own child or parent holds the pair


def _socket_pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for end in (ours, theirs):
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    return ours, theirs


# -- the service's side -----------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Reserve:
    """A call's reservation asked of the child: its answer goes to ``waiter`` on ``loop``."""

    request: ReserveRequest
    loop: asyncio.AbstractEventLoop
    waiter: asyncio.Future[ReserveAnswer | Literal["lost"]]
    # Given the reservation's id when nobody waits for the answer any more (the caller was
    # cancelled, its loop closed) and the answer is, or may be, a reservation taken.
    abandoned: Callable[[str], object] | None = None

    def deliver(self, answer: ReserveAnswer | Literal["lost"]) -> None:
        """On ``loop``: the answer to the caller, or given back if the caller is gone."""
        if not self.waiter.done():
            self.waiter.set_result(answer)
        else:
            self.give_back(answer)

    def give_back(self, answer: ReserveAnswer | Literal["lost"]) -> None:
        """Nobody waits for ``answer``: give its reservation back if one was, or may have
        been, taken."""
        if self.abandoned is not None and (answer == LOST or getattr(answer, "held", False)):
            self.abandoned(self.request.row_id)


@dataclass(eq=False)
class _Link:
    """One child process and the rows it owes an acknowledgement for."""

    process: subprocess.Popen[bytes]
    sock: socket.socket
    up: bool = False  # the child said it is ready
    lost: bool = False  # its rows were handed back; it takes no more
    pending: dict[int, _Write | _Reserve] = field(default_factory=dict)
    # The event loop reading the acknowledgements (None: the receiver thread reads them), and
    # the loop the socket is registered with (until that loop itself removes it: the socket is
    # never closed under a registration, whose descriptor a new socket could reuse).
    loop: asyncio.AbstractEventLoop | None = None
    registered_on: asyncio.AbstractEventLoop | None = None
    released: threading.Event = field(default_factory=threading.Event)  # the thread's turn


class WriterProcess:
    """Starts, feeds and watches the writer process of one service process."""

    def __init__(
        self,
        config: WriterConfig,
        *,
        on_lost: Callable[[list[_Write]], None],
        announce: Callable[[Settled], None],
    ) -> None:
        self._config = config
        self._on_lost = on_lost  # rows sent to a child that died: the thread writes them
        self._announce = announce
        self._lock = threading.Lock()  # guards the link, the sequence and each link's pending
        self._link: _Link | None = None
        self._receiver: threading.Thread | None = None
        self._seq = 0
        self._retry_at = 0.0
        self._retry_delay = FIRST_RETRY_SECONDS
        self._closed = False
        # The event loop that reads the acknowledgements (see ``_adopt``).
        self._home: asyncio.AbstractEventLoop | None = None
        # What it did (read by /health and the tests): children started, rows acknowledged,
        # rows handed back to the thread because a child died without acknowledging them,
        # acknowledgement messages read on an event loop rather than by the receiver thread,
        # reservations answered.
        self.starts = 0
        self.acknowledged = 0
        self.handed_back = 0
        self.loop_reads = 0
        self.answered = 0  # reservations the child answered

    @property
    def state(self) -> ProcessState:
        """``up``, ``starting``, ``down`` (waiting to start again), ``idle`` or ``closed``."""
        with self._lock:
            link = self._link
            if self._closed:
                return "closed"
            if link is None:
                return "down" if self._retry_at else "idle"
            return "up" if link.up else "starting"

    @property
    def pid(self) -> int | None:
        link = self._link
        return link.process.pid if link is not None else None

    def start(self, *, wait: float = 0.0) -> bool:
        """Start the child now (a service does, at startup) rather than on the first write;
        wait up to ``wait`` seconds for it to be ready. True if it is."""
        with self._lock:
            if self._link is None:
                self._start_if_due()
        deadline = time.monotonic() + wait
        while self.state == "starting" and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.state == "up"

    @property
    def reserves(self) -> bool:
        """True if the child takes reservations (the service enforces budgets)."""
        return self._config.settings is not None

    def submit(self, job: _Write) -> bool:
        """Send ``job``'s row and settlement to the child; False if it cannot take it now
        (not started yet, restarting, closed, or too far behind): the caller writes it."""
        return self._send(job, lambda seq: (seq, job.record.to_wire(), job.settlement))

    def reserve(
        self, request: ReserveRequest, *, abandoned: Callable[[str], object] | None = None
    ) -> asyncio.Future[ReserveAnswer | Literal["lost"]] | None:
        """On an event loop: ask the child for ``request``'s reservation; the future of its
        answer (``LOST`` if the child died first), or None if it cannot take it now.
        ``abandoned``: what gives the reservation back if it is taken after the caller stopped
        waiting (cancelled: ``asyncio.wait_for``, ``task.cancel()``)."""
        if not self.reserves:
            return None
        loop = asyncio.get_running_loop()
        job = _Reserve(request, loop, loop.create_future(), abandoned)
        return job.waiter if self._send(job, lambda seq: (seq, request)) else None

    def _send(self, job: _Write | _Reserve, message_of: Callable[[int], Any]) -> bool:
        """Send ``job`` (as ``message_of(seq)``) to the child; False if it cannot take it now."""
        with self._lock:
            link = self._link
            if link is None or self._closed:
                self._start_if_due()  # (not once closed)
                return False
            if not link.up or link.lost or len(link.pending) >= MAX_IN_FLIGHT:
                return False
            self._seq += 1
            seq = self._seq
            link.pending[seq] = job
            if job.loop is not None and job.loop is not self._home:
                self._adopt(job.loop, link)
        try:
            message = _encode(message_of(seq))
            if len(message) > MAX_MESSAGE:
                raise ValueError("row too big for a message")
            link.sock.send(message, socket.MSG_DONTWAIT)  # whole or not at all
        except Exception as exc:
            with self._lock:
                taken = link.pending.pop(seq, None) is not None
            if not isinstance(exc, BlockingIOError | ValueError):
                logger.warning("The writer process stopped taking rows: %s", exc)
            # Not sent: the caller does it (unless the receiver already handed it back).
            return not taken
        return True

    def close(self) -> None:
        """Let the child commit and acknowledge what it has, then stop it (killed if it does
        not end within ``STOP_TIMEOUT_SECONDS``); rows it never took go to the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._home = None
            link, receiver = self._link, self._receiver
        if link is None:
            return
        self._release(link)  # the receiver thread reads the last acknowledgements
        if not link.up:  # still starting: it was sent nothing, so nothing is lost
            _kill(link.process)
        with contextlib.suppress(OSError):
            link.sock.shutdown(socket.SHUT_WR)  # the child's end of file: drain and exit
        if receiver is not None:
            receiver.join(STOP_TIMEOUT_SECONDS)
            if receiver.is_alive():
                logger.warning("The writer process did not stop in time; killing it")
                _kill(link.process)
                receiver.join(STOP_TIMEOUT_SECONDS)

    # -- internals ------------------------------------------------------------------------

    def _start_if_due(self) -> None:
        """Start a child (under ``_lock``) unless closed or waiting to retry."""
        if self._closed or time.monotonic() < self._retry_at:
            return
        ours, theirs = _socket_pair()
        try:
            process = subprocess.Popen(  # noqa: S603 - this interpreter, our module
                [sys.executable, "-m", "app.tracking.write_process", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                env=_child_environment(),
                cwd=BACKEND_ROOT,
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            ours.close()
            logger.warning("Could not start the writer process (%s); the thread writes", exc)
            self._schedule_retry()
            return
        finally:
            theirs.close()
        ours.sendall(_encode(self._config))
        link = _Link(process, ours)
        self._link = link
        self.starts += 1
        self._receiver = threading.Thread(
            target=self._receive, args=(link,), name="tracking-writer-acks", daemon=True
        )
        self._receiver.start()

    def _schedule_retry(self) -> None:
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, LAST_RETRY_SECONDS)

    def _receive(self, link: _Link) -> None:
        """The receiver thread: reads the child's messages while no event loop does, and
        hands its rows back once the child is gone (it alone sees the child's end)."""
        try:
            while True:
                self._wait_turn(link)
                if (message := _receive_message(link.sock)) is None:
                    break
                if message == READY:
                    with self._lock:
                        link.up = True
                        self._retry_delay = FIRST_RETRY_SECONDS
                        home = self._home
                    if home is not None and home.is_running():
                        with contextlib.suppress(RuntimeError):  # closed meanwhile
                            home.call_soon_threadsafe(self._register, link, home)
                    continue
                self._dispatch(link, message)
        except Exception:
            logger.exception("Reading the writer process's acknowledgements failed")
        finally:
            self._lose(link)

    # An event loop reads the acknowledgements when it can. The receiver thread would wake for
    # each one, take the GIL from the loop (which is busy running the SDK's Python) and wake the
    # loop again through its self-pipe to resolve the waiters: at one acknowledgement a call
    # that was a tenth of a millisecond of the loop's time per call (issue 17). So the first
    # running loop that writes through the child (the API's, in the service) watches the socket
    # itself (``add_reader``) and resolves its own waiters where it reads them; acks of other
    # loops' and of threads' rows go to them as before. The thread parks meanwhile, and takes
    # the reading back when that loop stops running, when the service closes, or at the child's
    # end of file (which only the thread acts on). A message is read whole by one reader or the
    # other, so a moment when both read loses nothing.

    def _adopt(self, loop: asyncio.AbstractEventLoop, link: _Link) -> None:
        """Under ``_lock``, on ``loop``: read acknowledgements on ``loop`` unless another
        running loop does."""
        home = self._home
        if home is not None and home.is_running():
            return
        self._home = loop
        self._register_locked(link, loop)

    def _register(self, link: _Link, loop: asyncio.AbstractEventLoop) -> None:
        """On ``loop``: watch ``link``'s socket there and park the receiver thread."""
        with self._lock:
            self._register_locked(link, loop)

    def _register_locked(self, link: _Link, loop: asyncio.AbstractEventLoop) -> None:
        """Under ``_lock``: ``_register``."""
        if link.lost or self._closed or self._home is not loop or link.loop is loop:
            return
        stale = link.registered_on
        if stale is not None and stale is not loop:
            if stale.is_running():
                return
            with contextlib.suppress(Exception):  # a stopped loop: nothing watches there
                stale.remove_reader(link.sock.fileno())
            link.registered_on = None
        if link.registered_on is None:
            try:
                loop.add_reader(link.sock.fileno(), self._read_on_loop, link, loop)
            except (OSError, RuntimeError, ValueError) as exc:
                logger.warning("Could not read acknowledgements on the event loop: %s", exc)
                return
            link.registered_on = loop
        link.loop = loop
        link.released.clear()

    def _read_on_loop(self, link: _Link, loop: asyncio.AbstractEventLoop) -> None:
        """The loop's reader: acknowledge what has arrived; at the child's end, step aside."""
        for _ in range(LOOP_READS_PER_WAKE):
            try:
                message = _receive_message(link.sock, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            if message is None:  # the child's end: the thread hands its rows back
                self._unregister(link, loop)
                return
            self.loop_reads += 1
            try:
                self._dispatch(link, message)
            except Exception:
                logger.exception("Reading the writer process's acknowledgements failed")

    def _unregister(self, link: _Link, loop: asyncio.AbstractEventLoop) -> None:
        """On ``loop``: stop watching ``link``'s socket and give the thread its turn."""
        with self._lock:
            if link.registered_on is loop:
                with contextlib.suppress(Exception):
                    loop.remove_reader(link.sock.fileno())
                link.registered_on = None
            if link.loop is loop:
                link.loop = None
                link.released.set()

    def _release(self, link: _Link) -> None:
        """From any thread: the receiver thread reads ``link`` again; its loop stops watching
        the socket now if this is that loop, else on its next turn."""
        with self._lock:
            link.loop = None
            link.released.set()
            registered = link.registered_on
        if registered is None:
            return
        if asyncio._get_running_loop() is registered:
            self._unregister(link, registered)
        elif registered.is_running():
            with contextlib.suppress(RuntimeError):
                registered.call_soon_threadsafe(self._unregister, link, registered)

    def _wait_turn(self, link: _Link) -> None:
        """Park the receiver thread while an event loop reads ``link``; take the reading back
        if that loop stops running (it can no longer read, and nobody else would)."""
        while (loop := link.loop) is not None:
            if link.released.wait(LOOP_CHECK_SECONDS):
                continue
            if loop.is_closed() or not loop.is_running():
                with self._lock:
                    if self._home is loop:
                        self._home = None
                self._release(link)

    def _dispatch(self, link: _Link, message: Any) -> None:
        if isinstance(message, tuple) and message[0] == RESERVED:
            self._answer(link, message[1])
        else:
            self._acknowledge(link, message)

    def _answer(self, link: _Link, answers: Iterable[tuple[int, ReserveAnswer]]) -> None:
        """Hand the child's reservation answers to the loops waiting for them."""
        with self._lock:
            jobs = [(link.pending.pop(seq, None), answer) for seq, answer in answers]
            self.answered += len(jobs)
        _resolve_reserves([(job, answer) for job, answer in jobs if isinstance(job, _Reserve)])

    def _acknowledge(
        self, link: _Link, acks: Iterable[tuple[int, tuple[bool, bool, bool], Any]]
    ) -> None:
        with self._lock:
            jobs = [
                (link.pending.pop(seq, None), WriteOutcome(*flags), settled)
                for seq, flags, settled in acks
            ]
            self.acknowledged += len(jobs)
        results: list[tuple[_Write, WriteOutcome | BaseException]] = []
        for job, outcome, settled in jobs:
            if job is None or isinstance(job, _Reserve):
                continue
            if not outcome.persisted:  # the child's counters are not the service's
                USAGE_SPOOLED.inc()
                USAGE_SPOOL_PENDING.inc()
            if settled is not None:
                try:
                    self._announce(settled)
                except Exception:
                    TRACKING_ERRORS.labels("settle").inc()
                    logger.exception("Could not announce a settlement")
            results.append((job, outcome))
        resolve_all(results)

    def _lose(self, link: _Link) -> None:
        """The child is gone: hand its unacknowledged rows to the thread, retry later."""
        _kill(link.process)
        with self._lock:
            link.lost, link.up = True, False
            taken, link.pending = list(link.pending.values()), {}
            jobs = [job for job in taken if not isinstance(job, _Reserve)]
            self.handed_back += len(jobs)
            if self._link is link:
                self._link = None
                if not self._closed:
                    self._schedule_retry()
            registered = link.registered_on
        if registered is not None and registered.is_running():
            # The loop removes its watch first, then closes the socket.
            try:
                registered.call_soon_threadsafe(self._unregister_and_close, link, registered)
            except RuntimeError:  # closed meanwhile
                link.sock.close()
        else:
            link.sock.close()
        code = link.process.returncode
        if jobs or (code not in (0, None) and not self._closed):
            logger.warning(
                "The writer process ended (exit code %s) with %d rows unacknowledged; "
                "the tracking thread writes them",
                code,
                len(jobs),
            )
        # A reservation asked and not answered may have been taken: its caller gives it back
        # (``DatabaseBudgetGuard.give_back``) before reserving on the tracking thread.
        _resolve_reserves([(job, LOST) for job in taken if isinstance(job, _Reserve)])
        if jobs:
            self._on_lost(jobs)

    def _unregister_and_close(self, link: _Link, loop: asyncio.AbstractEventLoop) -> None:
        self._unregister(link, loop)
        link.sock.close()


def _resolve_reserves(answers: list[tuple[_Reserve, ReserveAnswer | Literal["lost"]]]) -> None:
    """Deliver each answer on its caller's loop (one wake-up per loop; at once on that loop)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Reserve, Any]]] = {}
    for job, answer in answers:
        by_loop.setdefault(job.loop, []).append((job, answer))
    for loop, group in by_loop.items():

        def deliver_all(group: list[tuple[_Reserve, Any]] = group) -> None:
            for job, answer in group:
                job.deliver(answer)

        if asyncio._get_running_loop() is loop:
            deliver_all()
            continue
        try:
            loop.call_soon_threadsafe(deliver_all)
        except RuntimeError:  # a closed loop: nobody waits there any more
            for job, answer in group:
                job.give_back(answer)


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(OSError):
            process.kill()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        logger.error("The writer process %d did not die", process.pid)


def _child_environment() -> dict[str, str]:
    env = dict(os.environ)
    # The child's own metrics are not the service's: in multiprocess mode they would be merged
    # into /metrics and count the spool twice (the service counts what the child reports).
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.pop("prometheus_multiproc_dir", None)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{BACKEND_ROOT}{os.pathsep}{path}" if path else str(BACKEND_ROOT)
    return env


# -- the child's side -------------------------------------------------------------------------


def serve(sock: socket.socket) -> None:
    """Commit what arrives, batch by batch, and acknowledge each row; return at end of file."""
    from app.budgets.guard import settle_data
    from app.core.db import create_db_engine
    from app.tracking.breaker import engine_timeouts
    from app.tracking.db_worker import MAX_BATCH, _Write, write_batch
    from app.tracking.spool import UsageSpool
    from app.tracking.writer import UsageWriter

    config = _receive_message(sock)
    if not isinstance(config, WriterConfig):
        return
    extra: dict[str, Any] = engine_timeouts(config.database_url)
    if make_url(config.database_url).get_backend_name() != "sqlite":
        extra.update(pool_size=2, max_overflow=2)
    engine = create_db_engine(
        config.database_url, sqlite_busy_timeout=config.sqlite_busy_timeout, **extra
    )
    writer = UsageWriter(engine, UsageSpool(Path(config.spool_dir)))
    guard = None
    if config.settings is not None:
        from app.budgets.guard import DatabaseBudgetGuard
        from app.tracking.pricing import PriceBook

        # Reservations arrive priced (the worst case is the service's to compute): the book
        # is there for the guard's own use, the service's prices if it ever needs them.
        settings = config.settings
        prices = PriceBook.configured(settings.price_overrides, settings.prices_file)
        guard = DatabaseBudgetGuard(engine, settings, prices)
    sock.sendall(_encode(READY))

    def settling(
        record: UsageRecord, settlement: Mapping[str, Any], box: list[Settled]
    ) -> Callable[[Any], None]:
        def also(tx: Any) -> None:
            box[:] = [settle_data(tx, record, settlement)]

        return also

    try:
        while (first := _receive_message(sock)) is not None:
            batch = [first]
            done = False
            while len(batch) < MAX_BATCH:  # and whatever else has arrived: one transaction
                try:
                    message = _receive_message(sock, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                if message is None:
                    done = True
                    break
                batch.append(message)
            requests = [message for message in batch if len(message) == 2]
            if requests:  # first: their callers wait to make their calls
                answers = (
                    guard.reserve_requests([request for _, request in requests])
                    if guard is not None
                    else [None] * len(requests)
                )
                replies = [
                    (seq, answer) for (seq, _), answer in zip(requests, answers, strict=True)
                ]
                for start in range(0, len(replies), ACKS_PER_MESSAGE):
                    sock.sendall(_encode((RESERVED, replies[start : start + ACKS_PER_MESSAGE])))
            jobs: list[tuple[int, _Write, list[Settled]]] = []
            for seq, values, settlement in (message for message in batch if len(message) == 3):
                record = UsageRecord.from_wire(values)
                box: list[Settled] = []
                also = settling(record, settlement, box) if settlement is not None else None
                jobs.append((seq, _Write(record, also, settlement, future=Future()), box))
            if jobs:
                write_batch(writer, [job for _, job, _ in jobs])
            acks = []
            for seq, job, box in jobs:
                assert job.future is not None
                outcome = job.future.result()
                flags = (outcome.persisted, outcome.also_committed, outcome.settlement_spooled)
                acks.append((seq, flags, box[0] if box and outcome.also_committed else None))
            for start in range(0, len(acks), ACKS_PER_MESSAGE):
                sock.sendall(_encode(acks[start : start + ACKS_PER_MESSAGE]))
            if done:
                break
    finally:
        engine.dispose()


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the service, which drains us
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s asa-writer[%(process)d] %(name)s: %(message)s"
    )
    sock = socket.socket(fileno=int(argv[1]))
    try:
        serve(sock)
    except (BrokenPipeError, ConnectionResetError):
        return 0  # the service is gone; what it did not acknowledge it writes itself
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    # Run as the imported module, not ``__main__``, so that the frames unpickle to its classes.
    from app.tracking import write_process

    sys.exit(write_process.main(sys.argv))
