"""Recompute runs in the background of a service process, for the admin API.

A recompute of millions of rows takes minutes: the API records the run (``running``), hands its
batches to a thread of its own and answers at once, or as soon as the run finishes if that is
within the request's wait. The run's audit record shows its progress (rows examined, the totals
so far, updated with every batch) and then its outcome; nothing but the record is shared with
the request.

The runtime keeps the process's runs (``BackgroundRuns``) and stops them when it closes: each
ends after the batch in flight and is recorded ``failed`` as interrupted, its committed batches
complete. A process killed during a run leaves it ``running`` in the record, with its committed
batches complete too. Either way, running it again finishes the work.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import Engine

from app.core.errors import ServiceUnavailable
from app.prices.recompute import BATCH_ROWS, RecomputeScope, run_batches, start_run
from app.tracking.pricing import PriceBook

logger = logging.getLogger(__name__)


class BackgroundRun:
    """One run's thread; ``wait`` for it to end, for a bounded time."""

    def __init__(
        self,
        engine: Engine,
        book: PriceBook,
        scope: RecomputeScope,
        *,
        actor: str,
        dry_run: bool,
        batch_rows: int = BATCH_ROWS,
    ) -> None:
        self.run_id = start_run(engine, book, scope, actor=actor, dry_run=dry_run)
        self._done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run,
            args=(engine, book, scope, dry_run, batch_rows),
            name=f"price-recompute-{self.run_id[:8]}",
            daemon=True,
        )
        self._thread.start()

    def _run(
        self, engine: Engine, book: PriceBook, scope: RecomputeScope, dry_run: bool, rows: int
    ) -> None:
        try:
            run_batches(
                engine, book, scope, self.run_id, dry_run=dry_run, batch_rows=rows, stop=self._stop
            )
        except Exception:  # recorded on the run as ``failed`` with its error
            logger.exception("Price recompute %s failed", self.run_id)
        finally:
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, seconds: float) -> bool:
        """True when the run has ended (done, failed or interrupted) within ``seconds``."""
        return self._done.wait(seconds)

    def interrupt(self) -> None:
        """End the run after the batch in flight (recorded as interrupted)."""
        self._stop.set()


class BackgroundRuns:
    """The runs a process started; ``stop`` interrupts those still going and waits for them."""

    def __init__(self) -> None:
        self._runs: list[BackgroundRun] = []
        self._lock = threading.Lock()
        self._closed = False

    def start(
        self,
        engine: Engine,
        book: PriceBook,
        scope: RecomputeScope,
        *,
        actor: str,
        dry_run: bool,
        batch_rows: int = BATCH_ROWS,
    ) -> BackgroundRun:
        """Record the run and start its batches on a thread of its own."""
        with self._lock:
            if self._closed:
                raise ServiceUnavailable("The service is stopping: no new recompute runs")
            self._runs = [run for run in self._runs if not run.done]
            run = BackgroundRun(
                engine, book, scope, actor=actor, dry_run=dry_run, batch_rows=batch_rows
            )
            self._runs.append(run)
            return run

    def stop(self, timeout: float) -> None:
        """Interrupt every run still going and wait up to ``timeout`` seconds for them all."""
        with self._lock:
            self._closed = True
            runs = list(self._runs)
        for run in runs:
            run.interrupt()
        deadline = time.monotonic() + timeout
        for run in runs:
            if not run.wait(max(0.0, deadline - time.monotonic())):
                logger.warning("Price recompute %s still running at shutdown", run.run_id)
