"""The thread that runs async callers' tracking SQL, many usage rows per transaction.

An ``AsyncLLMClient`` call has two blocking steps: the budget reservation before the call and
the usage row (with the budget's settlement) after it. On anyio's worker threads (up to 40) a
burst of concurrent calls convoyed: every thread wants the GIL back after each statement, so
the holder of the SQLite write lock waited several GIL switch intervals per transaction while
the others queued behind it. Here one thread per database does that work, and a write takes the
writes queued behind it into the same transaction: one commit (one fsync on PostgreSQL) for the
lot. The event loop only awaits a future. One thread, not a few: two batches committing side by
side would lock the shared rollup and counter rows of several calls in different orders, which
PostgreSQL can only resolve as a deadlock.

A failed batch is written again row by row through ``UsageWriter.write``, which spools what the
database refuses, so batching never costs a row; each row still commits with its settlement.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from app.core.prepared import Tx
from app.tracking.record import UsageRecord
from app.tracking.writer import UsageWriter, WriteOutcome, insert_usage

logger = logging.getLogger(__name__)

T = TypeVar("T")
MAX_BATCH = 256


@dataclass(slots=True)
class _Write:
    record: UsageRecord
    also: Callable[[Tx], None] | None
    future: Future[WriteOutcome] = field(default_factory=Future)


@dataclass(slots=True)
class _Call:
    fn: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)


_STOP = object()


class DbWorker:
    """Runs tracking work submitted from event loops on one dedicated thread."""

    def __init__(self, writer: UsageWriter) -> None:
        self._writer = writer
        self._queue: queue.SimpleQueue[_Write | _Call | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def write(self, record: UsageRecord, also: Callable[[Tx], None] | None) -> Future[WriteOutcome]:
        """Persist (or spool) ``record`` with ``also`` in its transaction; never fails."""
        job = _Write(record, also)
        self._submit(job)
        return job.future

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on a worker thread; its result or exception lands in the future."""
        job = _Call(fn)
        self._submit(job)
        return job.future

    def close(self) -> None:
        """Finish every submitted job, then stop the thread."""
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
        for job in jobs:
            if isinstance(job, _Call):
                try:
                    job.future.set_result(job.fn())
                except BaseException as exc:
                    job.future.set_exception(exc)

    def _write_batch(self, writes: list[_Write]) -> None:
        if len(writes) > 1:
            try:
                with self._writer.gate.transaction() as tx:
                    for job in writes:
                        insert_usage(tx, job.record)
                        if job.also is not None:
                            job.also(tx)
            except Exception as exc:
                logger.warning(
                    "A batch of %d usage rows failed; writing one by one: %s", len(writes), exc
                )
            else:
                for job in writes:
                    job.future.set_result(WriteOutcome(True, job.also is not None))
                return
        for job in writes:
            try:
                job.future.set_result(self._writer.write(job.record, also=job.also))
            except BaseException as exc:
                job.future.set_exception(exc)
