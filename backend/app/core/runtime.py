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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx2
import openai
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings, get_settings
from app.core.db import SqliteCheckpointer, create_db_engine, create_session_factory
from app.core.prepared import write_gate
from app.services.budgets import DatabaseBudgetGuard
from app.services.db_worker import DbWorker
from app.services.pricing import PriceBook
from app.services.usage_spool import UsageSpool
from app.services.usage_writer import SpoolReplayer, UsageWriter

if TYPE_CHECKING:
    from app.simulator.server import SimulatorServer

logger = logging.getLogger(__name__)
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
    extras: dict[str, Any] = field(default_factory=dict)
    checkpointer: SqliteCheckpointer | None = None
    # The thread that does async callers' tracking SQL (created on first use).
    db_worker: DbWorker = field(init=False)

    def __post_init__(self) -> None:
        self.db_worker = DbWorker(self.writer)

    @functools.cached_property
    def secrets(self) -> tuple[str, ...]:
        return self.settings.secret_values

    @classmethod
    def build(cls, settings: Settings | None = None, *, start_background: bool = True) -> Runtime:
        settings = settings or get_settings()
        engine = create_db_engine(
            settings.database_url, sqlite_busy_timeout=settings.sqlite_busy_timeout_seconds
        )
        writer = UsageWriter(engine, UsageSpool(settings.spool_dir))
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
            price_book=PriceBook(settings.price_overrides),
            openai_client=sync_client,
            async_openai_client=async_client,
            llm_endpoint=base_url,
            simulator=simulator,
        )
        if settings.budget_enforcement:
            guard = DatabaseBudgetGuard(engine, settings, runtime.price_book)
            runtime.extras["budget_guard"] = guard
        if start_background:
            runtime.replayer = SpoolReplayer(writer, settings.spool_replay_interval_seconds)
            runtime.replayer.start()
        if engine.dialect.name == "sqlite":
            runtime.checkpointer = SqliteCheckpointer(engine)
            runtime.checkpointer.start()
        return runtime

    def close(self) -> None:
        """Replay what is spooled, then release connections and threads."""
        self.db_worker.close()
        if self.replayer is not None:
            self.replayer.stop()
        if self.checkpointer is not None:
            self.checkpointer.stop()
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
