"""Executes queued tasks: a dispatcher thread claims tasks up to a concurrency limit, runs each
``Orchestrator`` in a thread of its own, keeps their heartbeats and relays cancellations.

Several processes may run a worker against one PostgreSQL database: claiming is exactly-once
(see ``task_store.claim_next``). A crash leaves running tasks to ``recover_stale`` once their
lease expires; their sandboxes die with the process (bubblewrap's ``--die-with-parent``), and
the next start reaps the cgroups and workspaces they left (:mod:`app.sandbox.reap`).

Lifecycle bounds:

* **Cancel**: the dispatcher relays a cancellation at its next tick (at once when the API wakes
  it, else within ``TASK_POLL_INTERVAL_SECONDS``); the command running is killed within 0.1 s
  of that and the task ends ``cancelled``.
* **Stop** (SIGTERM): :meth:`TaskWorker.stop` returns within ``TASK_STOP_TIMEOUT_SECONDS``
  (default 10 s) plus one database write per task still running. It kills every running
  command at once, so a task running a test or a clone goes back to the queue within a fraction
  of a second; a task busy elsewhere (an LLM call) gets until the timeout to reach its next
  step, after which ``stop`` requeues it itself. Task threads are daemons: one still waiting on
  its LLM call does not hold the process, and it can no longer write to a task it gave up.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid

from sqlalchemy import func, select

from app.core.runtime import Runtime
from app.models import Task
from app.observability import ACTIVE_TASKS, set_queued_tasks
from app.sandbox.bwrap import INSTALL_HINT
from app.sandbox.reap import reap_leftovers
from app.sandbox.runner import detect_isolation
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
        self.stop_timeout = settings.task_stop_timeout_seconds
        self.worker_id = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._running: dict[str, Orchestrator] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="asa-task-dispatcher", daemon=True)

    def start(self) -> None:
        """Say how repository commands will be confined, reap what a killed predecessor left,
        and start dispatching."""
        isolation = detect_isolation()
        if isolation.bwrap is None:
            logger.warning(
                "Repository commands cannot be sandboxed: %s. Until bubblewrap is installed "
                "(`%s`), tasks are refused for anyone but the local administrator of open mode.",
                isolation.bwrap_missing,
                INSTALL_HINT,
            )
        if isolation.cgroups is None:
            logger.warning(
                "No cgroups for sandboxed commands (%s): memory is capped per process only, and "
                "the number of processes is not capped.",
                isolation.cgroups_missing,
            )
        reaped = reap_leftovers(self.runtime.settings.workspace_root, isolation)
        if reaped.cgroups or reaped.workspaces:
            logger.warning(
                "Reaped what a stopped service left: %d sandbox cgroup(s), %d workspace(s)",
                reaped.cgroups,
                len(reaped.workspaces),
            )
        self._thread.start()

    def wake(self) -> None:
        """A task was submitted or cancelled: look now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """Kill running commands and requeue running tasks, within ``timeout`` seconds (default
        ``TASK_STOP_TIMEOUT_SECONDS``) plus a database write per task (see the module
        docstring)."""
        deadline = time.monotonic() + (self.stop_timeout if timeout is None else timeout)
        self._stop.set()
        self._wake.set()
        with self._lock:
            for orchestrator in self._running.values():
                orchestrator.stop.set()  # the running command dies within 0.1 s
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            threads = list(self._threads.values())
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            stuck = dict(self._running)
        for task_id, orchestrator in stuck.items():
            if orchestrator.requeue():
                logger.warning(
                    "Task %s did not stop within the shutdown timeout; requeued it", task_id
                )

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
            task_id = task_store.claim_next(
                self.runtime.engine,
                self.worker_id,
                max_running_per_user=self.runtime.settings.max_running_tasks_per_user,
            )
            if task_id is None:
                break
            orchestrator = Orchestrator(self.runtime, task_id, worker_id=self.worker_id)
            thread = threading.Thread(
                target=self._run,
                args=(task_id, orchestrator),
                name=f"asa-task-{task_id}",
                daemon=True,  # see the module docstring: a stop never waits on it past its bound
            )
            with self._lock:
                self._running[task_id] = orchestrator
                self._threads[task_id] = thread
            ACTIVE_TASKS.labels("running").inc()
            thread.start()
        self._update_queue_gauge()

    def _run(self, task_id: str, orchestrator: Orchestrator) -> None:
        try:
            orchestrator.run()
        except Exception:
            logger.exception("Task %s crashed its worker thread", task_id)
        finally:
            with self._lock:
                self._running.pop(task_id, None)
                self._threads.pop(task_id, None)
            ACTIVE_TASKS.labels("running").dec()
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
            running[task_id].cancelled.set()  # kills its running command within 0.1 s

    def _update_queue_gauge(self) -> None:
        with self.runtime.session_factory() as session:
            queued = session.scalar(
                select(func.count()).select_from(Task).where(Task.status == "queued")
            )
        set_queued_tasks(queued or 0)
