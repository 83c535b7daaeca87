"""Recompute runs in the background of a service process, for the admin API.

A recompute of millions of rows takes minutes: the API records the run (``running``), hands its
batches to a thread of its own and answers at once, or as soon as the run finishes if that is
within the request's wait. The run's audit record shows its progress (rows examined, the totals
so far, updated with every batch) and then its outcome; nothing but the record is shared with
the request. A process that stops during a run leaves it ``running`` in the record with its
committed batches complete, as a failed run is: running it again finishes the work.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import Engine

from app.prices.recompute import RecomputeScope, run_batches, start_run
from app.tracking.pricing import PriceBook

logger = logging.getLogger(__name__)


class BackgroundRun:
    """One run's thread; ``wait`` for it to end, for a bounded time."""

    def __init__(
        self, engine: Engine, book: PriceBook, scope: RecomputeScope, *, actor: str, dry_run: bool
    ) -> None:
        self.run_id = start_run(engine, book, scope, actor=actor, dry_run=dry_run)
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._run,
            args=(engine, book, scope, dry_run),
            name=f"price-recompute-{self.run_id[:8]}",
            daemon=True,
        )
        self._thread.start()

    def _run(self, engine: Engine, book: PriceBook, scope: RecomputeScope, dry_run: bool) -> None:
        try:
            run_batches(engine, book, scope, self.run_id, dry_run=dry_run)
        except Exception:  # recorded on the run as ``failed`` with its error
            logger.exception("Price recompute %s failed", self.run_id)
        finally:
            self._done.set()

    def wait(self, seconds: float) -> bool:
        """True when the run has ended (done or failed) within ``seconds``."""
        return self._done.wait(seconds)


def start_in_background(
    engine: Engine, book: PriceBook, scope: RecomputeScope, *, actor: str, dry_run: bool
) -> BackgroundRun:
    """Record the run and start its batches on a thread of its own."""
    return BackgroundRun(engine, book, scope, actor=actor, dry_run=dry_run)
