"""The process's long-lived resources, built in one place and disposed of in one place.

The FastAPI lifespan builds a ``Runtime`` and installs it; code used outside the service (the
seed's ``LLMClient(task_id=..., user_id=...)`` in a script) gets one built lazily on first use
from the environment. Nothing here runs at import time.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx2
import openai
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.budgets.guard import DatabaseBudgetGuard, announce_settled, replay_settlement
from app.core.config import Settings, get_settings
from app.core.db import SqliteCheckpointer, create_db_engine, create_session_factory
from app.core.prepared import write_gate
from app.prices.recompute import describe_price_sources
from app.prices.runner import BackgroundRuns
from app.tracking.breaker import database_breaker, engine_timeouts
from app.tracking.db_worker import DbWorker
from app.tracking.pricing import PriceBook
from app.tracking.spool import UsageSpool
from app.tracking.write_process import WriterConfig, WriterProcess, shareable
from app.tracking.writer import SpoolReplayer, UsageWriter

if TYPE_CHECKING:
    from app.notifications.dispatcher import NotificationDispatcher
    from app.simulator.server import SimulatorServer
    from app.tasks.worker import TaskWorker
    from app.usage.retention import RetentionScheduler

logger = logging.getLogger(__name__)

RECOMPUTE_STOP_SECONDS = 60.0
# Scripted replies of the built-in simulator for the bundled example repositories.
EXAMPLE_SCRIPTS = Path(__file__).resolve().parents[1] / "simulator" / "scripts" / "examples.json"

# HTTP attempts of the current logical LLM call; the SDK's retries each pass the request hook.
current_attempts: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "asa_llm_attempts", default=None
)


def _count_attempt(_request: httpx2.Request) -> None:
    cell = current_attempts.get()
    if cell is not None:
        cell[0] += 1


async def _count_attempt_async(request: httpx2.Request) -> None:
    _count_attempt(request)


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    writer: UsageWriter
    price_book: PriceBook
    openai_client: openai.OpenAI
    async_openai_client: openai.AsyncOpenAI
    llm_endpoint: str
    simulator: SimulatorServer | None = None
    replayer: SpoolReplayer | None = None
    checkpointer: SqliteCheckpointer | None = None
    # Budget enforcement (None when BUDGET_ENFORCEMENT is off).
    budget_guard: DatabaseBudgetGuard | None = None
    # The background jobs of a service process (``start_jobs``); None in scripts and tests.
    task_worker: TaskWorker | None = None
    retention: RetentionScheduler | None = None
    notifications: NotificationDispatcher | None = None  # the outbox's dispatcher (issue 16)
    # The thread that does async callers' tracking SQL (created on first use).
    db_worker: DbWorker = field(init=False)
    recomputes: BackgroundRuns = field(init=False)  # price recompute runs of the admin API

    def __post_init__(self) -> None:
        self.recomputes = BackgroundRuns()
        self.db_worker = DbWorker(self.writer, self._writer_process())

    def _writer_process(self) -> Callable[[DbWorker], WriterProcess] | None:
        """How to build the writer process of ``TRACKING_WRITER=process`` (None: the thread)."""
        if self.settings.tracking_writer != "process" or not shareable(self.engine):
            return None
        config = WriterConfig(
            database_url=self.engine.url.render_as_string(hide_password=False),
            sqlite_busy_timeout=self.settings.sqlite_busy_timeout_seconds,
            spool_dir=str(self.writer.spool.directory),
            # Enforcing budgets: the child takes the event loops' reservations too.
            settings=self.settings if self.settings.budget_enforcement else None,
        )
        return lambda worker: WriterProcess(
            config, on_lost=worker.rewrite, announce=announce_settled
        )

    @functools.cached_property
    def secrets(self) -> tuple[str, ...]:
        return self.settings.secret_values

    @classmethod
    def build(cls, settings: Settings | None = None, *, start_background: bool = True) -> Runtime:
        settings = settings or get_settings()
        # First: a bad PRICES_FILE stops the start with its reason, before anything is built.
        price_book = PriceBook.configured(settings.price_overrides, settings.prices_file)
        engine = create_db_engine(
            settings.database_url,
            sqlite_busy_timeout=settings.sqlite_busy_timeout_seconds,
            **engine_timeouts(settings.database_url),
        )
        writer = UsageWriter(engine, UsageSpool(settings.spool_dir))
        # A spooled row's budget settlement is replayed with it (whether or not this process
        # enforces budgets: another one may have taken the reservation).
        writer.settlement_replayer = replay_settlement
        simulator: SimulatorServer | None = None
        if settings.uses_simulator and not settings.openai_base_url:
            from app.simulator.config import SimulatorConfig
            from app.simulator.server import SimulatorServer

            simulator = SimulatorServer(
                SimulatorConfig(
                    latency_ms=settings.simulator_latency_ms, scripts_path=EXAMPLE_SCRIPTS
                ),
                port=settings.simulator_port,
            )
            simulator.start()
            base_url = simulator.base_url
            logger.warning(
                "No OPENAI_API_KEY set: LLM calls go to the built-in simulator at %s "
                "(simulated replies, real accounting).",
                base_url,
            )
        else:
            base_url = settings.openai_base_url or "https://api.openai.com/v1"
        # The simulator ignores the key; an empty OPENAI_API_KEY means "use the simulator".
        key = settings.openai_api_key
        api_key = key.get_secret_value() if key is not None and not settings.uses_simulator else ""
        api_key = api_key or "simulator"
        limits = httpx2.Limits(max_connections=200, max_keepalive_connections=100)
        sync_client = openai.OpenAI(
            api_key=api_key,
            base_url=base_url,
            max_retries=settings.openai_max_retries,
            timeout=settings.openai_timeout_seconds,
            http_client=httpx2.Client(limits=limits, event_hooks={"request": [_count_attempt]}),
        )
        async_client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            max_retries=settings.openai_max_retries,
            timeout=settings.openai_timeout_seconds,
            http_client=httpx2.AsyncClient(
                limits=limits, event_hooks={"request": [_count_attempt_async]}
            ),
        )
        runtime = cls(
            settings=settings,
            engine=engine,
            session_factory=create_session_factory(engine),
            writer=writer,
            price_book=price_book,
            openai_client=sync_client,
            async_openai_client=async_client,
            llm_endpoint=base_url,
            simulator=simulator,
        )
        describe_price_sources(engine, price_book)  # the refs its rows will carry
        if settings.budget_enforcement:
            runtime.budget_guard = DatabaseBudgetGuard(engine, settings, runtime.price_book)
        if start_background:
            runtime.replayer = SpoolReplayer(writer, settings.spool_replay_interval_seconds)
            runtime.replayer.start()
        if engine.dialect.name == "sqlite":
            runtime.checkpointer = SqliteCheckpointer(engine)
            runtime.checkpointer.start()
        return runtime

    def start_jobs(self) -> None:
        """Start the service's background jobs: the task worker and the retention schedule.

        Imported here, not at the top: the jobs' modules use the runtime themselves.
        """
        if self.settings.run_task_worker and self.task_worker is None:
            from app.tasks.worker import TaskWorker

            self.task_worker = TaskWorker(self)
            self.task_worker.start()
        if self.settings.usage_retention_days is not None and self.retention is None:
            from app.usage.retention import RetentionScheduler

            self.retention = RetentionScheduler(
                self.engine,
                self.settings.usage_retention_days,
                self.settings.usage_retention_batch_size,
            )
            self.retention.start()
        if self.settings.notifications_dispatcher and self.notifications is None:
            from app.notifications.dispatcher import NotificationDispatcher

            self.notifications = NotificationDispatcher(self.engine, self.settings)
            self.notifications.start()

    def stop_jobs(self) -> None:
        """Stop the background jobs (the worker finishes or requeues what it runs)."""
        if self.task_worker is not None:
            self.task_worker.stop()
            self.task_worker = None
        if self.retention is not None:
            self.retention.stop()
            self.retention = None
        if self.notifications is not None:
            self.notifications.stop()
            self.notifications = None

    def close(self) -> None:
        """Stop the jobs, replay what is spooled, then release connections and threads."""
        self.stop_jobs()
        # A recompute run ends after its batch in flight (a batch: seconds at most).
        self.recomputes.stop(timeout=RECOMPUTE_STOP_SECONDS)
        self.db_worker.close()
        if self.replayer is not None:
            self.replayer.stop()
        if self.checkpointer is not None:
            self.checkpointer.stop()
        database_breaker(self.engine).close()
        write_gate(self.engine).close()
        self.openai_client.close()
        self.engine.dispose()
        if self.simulator is not None:
            self.simulator.stop()


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> Runtime:
    """The installed runtime, or one built from the environment on first use."""
    global _runtime
    if _runtime is None:
        with _runtime_lock:
            if _runtime is None:
                _runtime = Runtime.build()
    return _runtime


def set_runtime(runtime: Runtime | None) -> None:
    global _runtime
    with _runtime_lock:
        _runtime = runtime
