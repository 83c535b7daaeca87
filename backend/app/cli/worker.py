"""``asa worker``: run queued tasks and the background jobs, without serving HTTP.

    asa worker [--metrics-port PORT] [--metrics-host HOST]

Runs what a service process runs besides its API: the task worker (``MAX_CONCURRENT_TASKS``
tasks at once, whatever ``RUN_TASK_WORKER`` says), the retention schedule
(``USAGE_RETENTION_DAYS``), the notifications dispatcher (``NOTIFICATIONS_DISPATCHER``) and the
spool replayer, on the database of ``DATABASE_URL``. Any number of workers, on any machines,
share one PostgreSQL queue: a task is claimed by exactly one of them. API processes then run
with ``RUN_TASK_WORKER=false``.

SIGTERM or SIGINT stops it gracefully (``TaskWorker.stop``): running commands are killed at once,
running tasks go back to the queue within ``TASK_STOP_TIMEOUT_SECONDS``, the spool is replayed,
and the exit status is 0. ``--metrics-port`` serves the process's ``/metrics`` for Prometheus
(``METRICS_TOKEN`` applies as on the API).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import threading
from types import FrameType

from app.core.config import Settings
from app.core.heap import freeze_startup_heap
from app.core.redaction import install_log_redaction
from app.core.runtime import Runtime, set_runtime
from app.observability import MetricsServer, check_metrics_mode, setup_telemetry
from app.tasks.examples import materialize_examples

logger = logging.getLogger("app.worker")


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = groups.add_parser(
        "worker", help="run queued tasks and the background jobs (no HTTP API)"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="serve GET /metrics on this port (default: no metrics endpoint)",
    )
    parser.add_argument(
        "--metrics-host", help="the address /metrics listens on (default: BIND_HOST)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; returns the exit status."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    settings = settings.model_copy(update={"run_task_worker": True})
    check_metrics_mode(settings)
    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        if not stop.is_set():
            logger.info("ASA worker: %s received, stopping", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    stop_redacting_logs = install_log_redaction(settings.secret_values)
    runtime = Runtime.build(settings)
    metrics: MetricsServer | None = None
    telemetry = setup_telemetry(settings, engine=runtime.engine)
    try:
        set_runtime(runtime)
        materialize_examples(settings.examples_dir)
        runtime.start_jobs()
        if args.metrics_port:
            metrics = _serve_metrics(args, settings)
        freeze_startup_heap()  # full collections then skip it (app/core/heap.py)
        logger.info(
            "ASA worker ready: %d task slot(s), database %s%s",
            settings.max_concurrent_tasks,
            runtime.engine.url.render_as_string(hide_password=True),
            f", metrics on port {metrics.port}" if metrics is not None else "",
        )
        while not stop.wait(0.5):
            pass
    finally:
        if metrics is not None:
            metrics.stop()
        runtime.stop_jobs()  # kills running commands, requeues running tasks
        set_runtime(None)
        try:
            asyncio.run(runtime.async_openai_client.close())
        finally:
            runtime.close()  # replays the spool
            telemetry.shutdown()
            stop_redacting_logs()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    logger.info("ASA worker stopped")
    return 0


def _serve_metrics(args: argparse.Namespace, settings: Settings) -> MetricsServer:
    host = args.metrics_host or settings.bind_host
    token = settings.metrics_token
    if token is None and not _is_loopback(host):
        logger.warning(
            "Worker /metrics is readable by anyone who reaches %s; set METRICS_TOKEN to require "
            "a bearer token.",
            host,
        )
    server = MetricsServer(
        host,
        args.metrics_port,
        token.get_secret_value() if token is not None else None,
        settings.prometheus_multiproc_dir,
    )
    server.start()
    return server


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
