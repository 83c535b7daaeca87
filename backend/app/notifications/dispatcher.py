"""The dispatcher: a background thread that delivers the outbox, at least once.

Each round, in transactions of its own and never on an LLM call's path:

1. fan-out: due ``pending`` events become one delivery per matching subscription;
2. claim: up to ``NOTIFICATION_BATCH_SIZE`` due deliveries (``FOR UPDATE SKIP LOCKED`` on
   PostgreSQL, so dispatchers in several processes share the work), each with a lease;
3. send, ``NOTIFICATION_CONCURRENCY`` at a time, each bounded by
   ``NOTIFICATION_SEND_TIMEOUT_SECONDS``, with no transaction open;
4. record: delivered; or due again after an exponential backoff; or, after
   ``NOTIFICATION_MAX_ATTEMPTS`` tries, a dead letter that an administrator can retry.

A database outage only delays: a failed round is logged and retried with a growing pause (up to
30 s), and outcomes that could not be recorded are kept in memory and recorded first when the
database is back. A dispatcher killed mid-send leaves its claims ``sending``; when their lease
lapses another round sends them again. A receiver may therefore see an event twice, always with
the same ``id`` (and a webhook with the same body).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from app.core.config import Settings
from app.notifications import outbox, store
from app.notifications.channels import DeliveryFailed, Sender
from app.usage.anomalies import record_anomalies
from app.usage.forecast import record_forecasts_over_budget
from app.usage.insights import refresh_recommendations
from app.usage.outcomes import fold_late_outcomes

logger = logging.getLogger(__name__)

MAX_OUTAGE_PAUSE_SECONDS = 30.0


class NotificationDispatcher:
    """One per service process (``Runtime.start_jobs``); ``run_once`` is one round."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        clock: Callable[[], datetime] = store.utcnow,
        sender: Sender | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self._clock = clock
        self._sender = sender or Sender(settings.notification_send_timeout_seconds)
        self._pool = ThreadPoolExecutor(
            max_workers=settings.notification_concurrency, thread_name_prefix="asa-notify-send"
        )
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._unrecorded: list[store.Outcome] = []
        self._next_unpriced_scan = 0.0
        self._next_insights_scan = 0.0
        self.delivered = 0  # deliveries this dispatcher saw succeed (for benchmarks and tests)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="asa-notifications", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the round in flight (its sends are bounded), record it, and stop."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            wait = timeout if timeout is not None else self._sender.timeout * 4 + 5
            self._thread.join(wait)
            self._thread = None
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._sender.close()

    def wake(self) -> None:
        """Start the next round now rather than after the poll interval."""
        self._wake.set()

    # -- rounds -----------------------------------------------------------------------------

    def run_once(self) -> int:
        """One round: fan out, claim, send, record; how many deliveries were tried.

        Raises ``SQLAlchemyError`` when the database fails (the thread retries the round).
        """
        if self._unrecorded:
            self._record(self._unrecorded)
            self._unrecorded = []
        settings = self.settings
        self._scan_unpriced()
        self._scan_insights()
        store.fan_out(self.engine, self._clock(), settings.notification_batch_size)
        claimed = store.claim_deliveries(
            self.engine,
            self._clock(),
            settings.notification_batch_size,
            timedelta(seconds=settings.notification_lease_seconds),
        )
        if not claimed:
            return 0
        outcomes = list(self._pool.map(self._send, claimed))
        self.delivered += sum(outcome.error is None for outcome in outcomes)
        try:
            self._record(outcomes)
        except SQLAlchemyError:
            self._unrecorded = outcomes  # recorded first when the database is back
            raise
        return len(claimed)

    def _send(self, claimed: store.Claimed) -> store.Outcome:
        try:
            self._sender.send(claimed.channel, claimed.payload, claimed.recipient)
        except DeliveryFailed as exc:
            logger.info(
                "Notification %s to channel %s failed (try %d): %s",
                claimed.event_id,
                claimed.channel.name,
                claimed.attempts,
                exc,
            )
            return store.Outcome(claimed, str(exc) or "failed")
        except Exception as exc:  # a bug in a sender must not stop the dispatcher
            # Only the type: the message of an unexpected error may quote a channel's secret.
            logger.error("Notification sender failed unexpectedly: %s", type(exc).__name__)
            return store.Outcome(claimed, f"internal error: {type(exc).__name__}")
        return store.Outcome(claimed, None)

    def _record(self, outcomes: list[store.Outcome]) -> None:
        store.record_outcomes(
            self.engine,
            outcomes,
            self._clock(),
            max_attempts=self.settings.notification_max_attempts,
            backoff_base=self.settings.notification_backoff_base_seconds,
            backoff_max=self.settings.notification_backoff_max_seconds,
        )
        for outcome in outcomes:
            if outcome.error is not None and outcome.claimed.attempts >= (
                self.settings.notification_max_attempts
            ):
                logger.warning(
                    "Notification %s to channel %s is a dead letter after %d tries: %s",
                    outcome.claimed.event_id,
                    outcome.claimed.channel.name,
                    outcome.claimed.attempts,
                    outcome.error,
                )

    def _scan_unpriced(self) -> None:
        if time.monotonic() < self._next_unpriced_scan:
            return
        self._next_unpriced_scan = (
            time.monotonic() + self.settings.notification_unpriced_scan_seconds
        )
        outbox.record_unpriced_models(self.engine, self._clock().date())

    def _scan_insights(self) -> None:
        """Spend anomalies and forecasts over a monthly budget (issue 16), every
        ``INSIGHTS_SCAN_SECONDS``; the events' ids make a repeated finding one event. And
        everyone's recommendations, recomputed ahead of the administrators who ask."""
        if time.monotonic() < self._next_insights_scan:
            return
        self._next_insights_scan = time.monotonic() + self.settings.insights_scan_seconds
        now = self._clock()
        record_anomalies(self.engine, self.settings, now)
        record_forecasts_over_budget(self.engine, self.settings, now)
        fold_late_outcomes(self.engine)  # keeps the tasks the recommendations correct few
        refresh_recommendations(self.engine, self.settings, now)

    def _run(self) -> None:
        pause = self.settings.notification_poll_interval_seconds
        outage_pause = pause
        down = False
        while not self._stop.is_set():
            try:
                busy = self.run_once() >= self.settings.notification_batch_size
            except SQLAlchemyError as exc:
                if not down:
                    logger.warning(
                        "Notifications wait for the database (%s); none is lost, they are "
                        "delivered when it is back.",
                        type(exc).__name__,
                    )
                down = True
                outage_pause = min(MAX_OUTAGE_PAUSE_SECONDS, outage_pause * 2)
                self._wake.wait(outage_pause)
                self._wake.clear()
                continue
            except Exception:
                logger.exception("Notification round failed")
                busy = False
            if down:
                logger.info("Notifications: the database is back.")
                down, outage_pause = False, pause
            if not busy:
                self._wake.wait(pause)
                self._wake.clear()
