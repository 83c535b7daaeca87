"""The thread that runs async callers' tracking SQL, many usage rows per transaction.

With ``TRACKING_WRITER=process`` (the default) the usage rows themselves go to the writer
process (``app.tracking.write_process``), which runs this module's ``write_batch``; the thread
keeps the budget reservations, the settlements that could not join a row, and the rows a writer
process took and died before acknowledging (``rewrite``: their settlement only if the row is
new). What follows describes the thread.

An ``AsyncLLMClient`` call has two blocking steps: the budget reservation before the call and
the usage row (with the budget's settlement) after it. On anyio's worker threads (up to 40) a
burst of concurrent calls convoyed: every thread wants the GIL back after each statement, so
the holder of the SQLite write lock waited several GIL switch intervals per transaction while
the others queued behind it. Here one thread per database does that work, and a write takes the
writes queued behind it into the same transaction: one commit (one fsync on PostgreSQL) for the
lot, the rows in one ``executemany`` and each rollup's increments summed per key first
(``writer.insert_new_usage``), so calls of one task written together cost one statement per
rollup. The event loop only awaits a future. One thread, not a few: two batches committing side by
side would lock the shared rollup and counter rows of several calls in different orders, which
PostgreSQL can only resolve as a deadlock.

A failed batch is written again row by row through ``UsageWriter.write``, which spools what the
database refuses, so batching never costs a row; each row still commits with its settlement.
While the database breaker is open the rows go to the spool without a database wait.

Calls can be batched too (``batched``): the budget guard's reservations queued together are
taken in one transaction. The thread runs the queued calls once in a collecting pass, where a
function that calls ``batched(runner, item)`` stops there (``_Join``, a ``BaseException`` so that
no ``except Exception`` of the caller's can mistake it for a failure of its own); ``runner``
then does the items of all of them at once (one transaction), and each function runs again,
now getting its item's result from ``batched``. A function must therefore do nothing before its
``batched`` call that it cannot do twice; the guard's ``reserve`` calls it first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from app.core.prepared import Tx
from app.tracking.record import UsageRecord
from app.tracking.writer import UsageWriter, WriteOutcome, insert_new_usage

if TYPE_CHECKING:
    from app.tracking.write_process import WriterProcess

logger = logging.getLogger(__name__)

T = TypeVar("T")
MAX_BATCH = 256
# Does the items of several calls at once; one result per item, in order (None: do that item
# alone, the way the call would without a batch).
BatchRunner = Callable[[Sequence[Any]], Sequence[Any]]


class _Join(BaseException):  # a signal, not an error: no ``except Exception`` may catch it
    """Raised by ``batched`` in the collecting pass: this call joins the batch of ``runner``."""

    def __init__(self, runner: BatchRunner, item: Any) -> None:
        super().__init__()
        self.runner = runner
        self.item = item


class _Pass(threading.local):
    collecting = False
    result: Any = None


_pass = _Pass()


def batched(runner: BatchRunner, item: Any) -> Any:
    """Inside a call run by a ``DbWorker`` together with others: the result ``runner`` gave
    for ``item`` (None if it had none, or outside a batch: then do the work alone)."""
    if _pass.collecting:
        raise _Join(runner, item)
    result, _pass.result = _pass.result, None
    return result


@dataclass(slots=True)
class _Write:
    record: UsageRecord
    also: Callable[[Tx], None] | None
    settlement: Mapping[str, Any] | None = None
    # Where the outcome goes: ``waiter`` on ``loop`` for an event loop's caller, else ``future``.
    future: Future[WriteOutcome] | None = None
    loop: asyncio.AbstractEventLoop | None = None
    waiter: asyncio.Future[WriteOutcome] | None = None
    # Sent to a writer process that died before acknowledging it: the row may be in the ledger
    # already, with its settlement, so ``also`` runs only if the row is new.
    repeat: bool = False

    def resolve(self, outcome: WriteOutcome | BaseException) -> None:
        """Hand the outcome (or the exception) to whoever waits; from any thread."""
        if self.loop is not None:
            deliver(self.loop, [(self, outcome)])
        elif self.future is not None:
            if isinstance(outcome, BaseException):
                self.future.set_exception(outcome)
            else:
                self.future.set_result(outcome)


def deliver(
    loop: asyncio.AbstractEventLoop, results: list[tuple[_Write, WriteOutcome | BaseException]]
) -> None:
    """Resolve the waiters of ``results`` (all on ``loop``) with one wake-up of the loop, or
    at once when called on ``loop`` itself."""
    _resolve_on(
        loop,
        [
            (job.waiter, None, outcome)
            if isinstance(outcome, BaseException)
            else (job.waiter, outcome, None)
            for job, outcome in results
        ],
    )


def _resolve_on(
    loop: asyncio.AbstractEventLoop,
    resolutions: list[tuple[asyncio.Future[Any] | None, Any, BaseException | None]],
) -> None:
    """Set each (waiter, value, error) on ``loop``: at once when called there (the writer
    process's acks read on that loop), else with one wake-up of the loop for the lot."""

    def resolve_here() -> None:
        for waiter, value, error in resolutions:
            if waiter is None or waiter.done():
                continue  # the caller stopped waiting (cancelled)
            if error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(value)

    if asyncio._get_running_loop() is loop:
        resolve_here()
        return
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
        loop.call_soon_threadsafe(resolve_here)


@dataclass(slots=True)
class _Call:
    fn: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)
    # An event loop's caller (``call_async``) also waits on ``waiter``, resolved from ``future``
    # with the other calls of its batch on the same loop: one wake-up of the loop for the lot.
    loop: asyncio.AbstractEventLoop | None = None
    waiter: asyncio.Future[Any] | None = None


_STOP = object()


class DbWorker:
    """Runs tracking work submitted from event loops on one dedicated thread."""

    def __init__(
        self,
        writer: UsageWriter,
        process: Callable[[DbWorker], WriterProcess] | None = None,
    ) -> None:
        self._writer = writer
        self._queue: queue.SimpleQueue[_Write | _Call | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        # The writer process that commits rows outside this process's GIL (``process(self)``
        # builds it; None: this thread writes them).
        self.process = process(self) if process is not None else None

    def write(
        self,
        record: UsageRecord,
        also: Callable[[Tx], None] | None,
        settlement: Mapping[str, Any] | None = None,
    ) -> Future[WriteOutcome]:
        """Persist (or spool, with ``settlement``) ``record`` with ``also`` in its transaction;
        never fails.

        With a writer process the row goes there whenever its joined work can travel as data:
        ``also`` must then be the settlement of the reservation ``settlement`` (what the budget
        guard's ``settle`` does), which the writer process performs in its place.
        """
        job = _Write(record, also, settlement, future=Future())
        self._route(job)
        assert job.future is not None
        return job.future

    async def write_async(
        self,
        record: UsageRecord,
        also: Callable[[Tx], None] | None,
        settlement: Mapping[str, Any] | None = None,
    ) -> WriteOutcome:
        """``write`` for an event loop: the outcome comes back without a thread's future (a
        writer process's acknowledgements wake the loop once per batch, not once per row)."""
        loop = asyncio.get_running_loop()
        job = _Write(record, also, settlement, loop=loop, waiter=loop.create_future())
        self._route(job)
        assert job.waiter is not None
        return await job.waiter

    def _route(self, job: _Write) -> None:
        process = self.process
        if (
            process is None
            or (job.also is not None and job.settlement is None)
            or not process.submit(job)
        ):
            self._submit(job)

    def rewrite(self, jobs: list[_Write]) -> None:
        """Write on this thread the rows a writer process took and never acknowledged."""
        for job in jobs:
            job.repeat = True
            self._submit(job)

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on a worker thread; its result or exception lands in the future."""
        job = _Call(fn)
        self._submit(job)
        return job.future

    async def call_async(
        self, fn: Callable[[], T], *, abandoned: Callable[[T], object] | None = None
    ) -> T:
        """``call`` for an event loop: the calls run together wake their loop once, not once
        per call (``asyncio.wrap_future`` would). ``abandoned``: given ``fn``'s result, on this
        thread, if the caller was cancelled before it came (e.g. to give back what it took)."""
        loop = asyncio.get_running_loop()
        job = _Call(fn, loop=loop, waiter=loop.create_future())
        self._submit(job)
        assert job.waiter is not None
        try:
            return await job.waiter  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            if abandoned is not None:
                job.future.add_done_callback(functools.partial(_hand_over, abandoned))
            raise

    def close(self) -> None:
        """Let the writer process finish, then every submitted job, then stop the thread."""
        if self.process is not None:
            self.process.close()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(timeout=30)

    # -- internals ------------------------------------------------------------------------

    def _submit(self, job: _Write | _Call) -> None:
        with self._lock:
            if not self._closed:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._loop, name="tracking-db", daemon=True
                    )
                    self._thread.start()
                self._queue.put(job)
                return
        self._run([job])  # after close (shutdown): do it here rather than lose it

    def _loop(self) -> None:
        while True:
            jobs: list[_Write | _Call] = []
            stop = False
            item = self._queue.get()
            while True:
                if isinstance(item, _Write | _Call):
                    jobs.append(item)
                else:
                    stop = True  # _STOP: finish what was taken, then end
                    break
                if len(jobs) >= MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            self._run(jobs)
            if stop:
                return

    def _run(self, jobs: list[_Write | _Call]) -> None:
        writes = [job for job in jobs if isinstance(job, _Write)]
        if writes:
            self._write_batch(writes)
        calls = [job for job in jobs if isinstance(job, _Call)]
        if len(calls) == 1:
            _finish(calls[0])
        elif calls:
            self._call_batch(calls)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any, Any]]] = {}
        for job in calls:
            if job.loop is not None:
                error = job.future.exception()
                value = None if error is not None else job.future.result()
                by_loop.setdefault(job.loop, []).append((job.waiter, value, error))
        for loop, group in by_loop.items():
            _resolve_on(loop, group)

    def _call_batch(self, calls: list[_Call]) -> None:
        """Collect the calls that join a batch, run each batch's runner once, finish them all."""
        joined: dict[BatchRunner, list[tuple[_Call, Any]]] = {}
        for job in calls:
            _pass.collecting = True
            try:
                job.future.set_result(job.fn())
            except _Join as join:
                joined.setdefault(join.runner, []).append((job, join.item))
            except BaseException as exc:
                job.future.set_exception(exc)
            finally:
                _pass.collecting = False
        for runner, members in joined.items():
            try:
                results = list(runner([item for _, item in members]))
            except Exception:
                logger.exception("A batch of %d calls failed; running them alone", len(members))
                results = [None] * len(members)
            for (job, _), result in zip(members, results, strict=True):
                _pass.result = result
                try:
                    _finish(job)
                finally:
                    _pass.result = None

    def _write_batch(self, writes: list[_Write]) -> None:
        write_batch(self._writer, writes)


def write_batch(writer: UsageWriter, writes: list[_Write]) -> None:
    """Commit ``writes`` in one transaction, or one by one if that fails (``writer.write``
    spools what the database refuses); each job's future gets its ``WriteOutcome``."""
    fresh = [job for job in writes if not job.repeat]
    outcomes: list[tuple[_Write, WriteOutcome | BaseException]] = []
    if len(fresh) > 1 and not writer.breaker.is_open:
        try:
            with writer.breaker.transaction(writer.gate) as tx:
                insert_new_usage(tx, [job.record for job in fresh])
                for job in fresh:
                    if job.also is not None:
                        job.also(tx)
        except Exception as exc:
            logger.warning(
                "A batch of %d usage rows failed; writing one by one: %s", len(fresh), exc
            )
        else:
            outcomes = [(job, WriteOutcome(True, job.also is not None)) for job in fresh]
            writes = [job for job in writes if job.repeat]
    for job in writes:
        try:
            outcome: WriteOutcome | BaseException = writer.write(
                job.record, also=job.also, settlement=job.settlement, also_if_new=job.repeat
            )
        except BaseException as exc:
            outcome = exc
        outcomes.append((job, outcome))
    resolve_all(outcomes)


def resolve_all(results: list[tuple[_Write, WriteOutcome | BaseException]]) -> None:
    """Resolve each job's waiter or future: one wake-up per event loop for the lot."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Write, WriteOutcome | BaseException]]]
    by_loop = {}
    for job, outcome in results:
        if job.loop is not None:
            by_loop.setdefault(job.loop, []).append((job, outcome))
        else:
            job.resolve(outcome)
    for loop, group in by_loop.items():
        deliver(loop, group)


def _hand_over(abandoned: Callable[[Any], object], done: Future[Any]) -> None:
    """A cancelled caller's result, to ``abandoned`` (nothing if the call failed)."""
    if done.exception() is None:
        try:
            abandoned(done.result())
        except Exception:
            logger.exception("Handling an abandoned call's result failed")


def _finish(job: _Call) -> None:
    try:
        job.future.set_result(job.fn())
    except BaseException as exc:
        job.future.set_exception(exc)
