"""Executes queued tasks: a dispatcher thread claims tasks up to a concurrency limit, runs each
``Orchestrator`` in a worker thread, keeps their heartbeats and relays cancellations.

Several processes may run a worker against one PostgreSQL database: claiming is exactly-once
(see ``task_store.claim_next``). A graceful stop interrupts running tasks between steps and puts
them back in the queue; a crash leaves them to ``recover_stale`` once their lease expires.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

from sqlalchemy import func, select

from app.core.runtime import Runtime
from app.models import Task
from app.observability import ACTIVE_TASKS
from app.tasks import store as task_store
from app.tasks.orchestrator import Orchestrator

logger = logging.getLogger(__name__)


class TaskWorker:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        settings = runtime.settings
        self.capacity = settings.max_concurrent_tasks
        self.poll_interval = settings.task_poll_interval_seconds
        self.lease_seconds = settings.task_lease_seconds
        self.worker_id = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=self.capacity, thread_name_prefix="asa-task")
        self._running: dict[str, Orchestrator] = {}
        self._futures: dict[str, Future[str]] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="asa-task-dispatcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """A task was submitted or cancelled: look now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Interrupt running tasks between steps (they are requeued) and wait for them."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            for orchestrator in self._running.values():
                orchestrator.stop.set()
        self._thread.join(timeout=timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        last_recovery = 0.0
        while not self._stop.is_set():
            try:
                self._tick()
                now = time.monotonic()
                if now - last_recovery > self.lease_seconds / 2:
                    last_recovery = now
                    for task_id in task_store.recover_stale(
                        self.runtime.engine, self.lease_seconds
                    ):
                        logger.warning("Recovered task %s from a stopped worker", task_id)
            except Exception:
                logger.exception("Task dispatcher iteration failed; retrying")
            self._wake.wait(self.poll_interval)
            self._wake.clear()

    def _tick(self) -> None:
        self._heartbeat_and_cancel()
        while not self._stop.is_set():
            with self._lock:
                if len(self._running) >= self.capacity:
                    break
            task_id = task_store.claim_next(self.runtime.engine, self.worker_id)
            if task_id is None:
                break
            orchestrator = Orchestrator(self.runtime, task_id)
            with self._lock:
                self._running[task_id] = orchestrator
            ACTIVE_TASKS.labels("running").inc()
            future = self._pool.submit(orchestrator.run)
            future.add_done_callback(functools.partial(self._done, task_id))
        self._update_queue_gauge()

    def _done(self, task_id: str, future: Future[str]) -> None:
        with self._lock:
            self._running.pop(task_id, None)
        ACTIVE_TASKS.labels("running").dec()
        if future.exception() is not None:
            logger.error("Task %s crashed its worker thread", task_id, exc_info=future.exception())
        self._wake.set()

    def _heartbeat_and_cancel(self) -> None:
        with self._lock:
            running = dict(self._running)
        if not running:
            return
        engine = self.runtime.engine
        for task_id, orchestrator in running.items():
            if not task_store.heartbeat(engine, task_id, self.worker_id):
                orchestrator.stop.set()  # no longer ours (recovered elsewhere): stop quietly
        with self.runtime.session_factory() as session:
            cancelled = session.scalars(
                select(Task.id).where(Task.id.in_(list(running)), Task.cancel_requested.is_(True))
            ).all()
        for task_id in cancelled:
            running[task_id].cancelled.set()

    def _update_queue_gauge(self) -> None:
        with self.runtime.session_factory() as session:
            queued = session.scalar(
                select(func.count()).select_from(Task).where(Task.status == "queued")
            )
        ACTIVE_TASKS.labels("queued").set(queued or 0)
