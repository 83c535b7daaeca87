"""Configuration: the one place that reads the environment.

Every variable is documented in the top-level ``.env.example``; names are the upper-case
field names.
"""

from __future__ import annotations

import os
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

BACKEND_DIR = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = BACKEND_DIR / "data"


class Settings(BaseSettings):
    """Typed settings read from the environment (and an optional ``.env`` file)."""

    model_config = SettingsConfigDict(
        env_file=".env", env_ignore_empty=True, extra="ignore", case_sensitive=False
    )

    # Storage
    database_url: str = Field(
        default=f"sqlite:///{DEFAULT_DATA_DIR / 'asa.db'}",
        description="Any SQLAlchemy URL; postgresql:// is served by psycopg 3.",
    )
    spool_dir: Path = Field(
        default=DEFAULT_DATA_DIR / "spool",
        description="Where usage rows wait when the database is unreachable.",
    )
    spool_replay_interval_seconds: float = Field(default=2.0, gt=0)
    sqlite_busy_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="How long a SQLite write waits for another connection's lock before it "
        "fails; a usage row then goes to the spool rather than hold up its call.",
    )
    tracking_writer: Literal["process", "thread"] = Field(
        default="process",
        description="Who commits async callers' usage rows and budget reservations: a writer "
        "process beside each service process (outside its GIL: the event loop keeps its CPU), "
        "or a thread in it. "
        "In-memory SQLite always uses the thread.",
    )
    usage_retention_days: int | None = Field(
        default=None, ge=1, description="Prune raw llm_usage rows older than this, daily."
    )
    usage_retention_batch_size: int = Field(default=10_000, ge=1, le=1_000_000)
    auto_migrate: bool = Field(
        default=True, description="Run the Alembic migrations to head when the service starts."
    )

    # LLM provider
    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = Field(
        default=None,
        description="Any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, a gateway).",
    )
    openai_max_retries: int = Field(default=2, ge=0, le=10)
    openai_timeout_seconds: float = Field(default=600.0, gt=0)
    default_model: str = "gpt-4o-mini"
    simulator_port: int = Field(default=0, ge=0, le=65535)
    simulator_latency_ms: float = Field(default=20.0, ge=0)

    # Pricing: JSON object {model: {"input_mtok": .., "output_mtok": .., "cache_read_mtok": ..}}
    price_overrides: Annotated[dict[str, dict[str, Decimal]], NoDecode] = Field(
        default_factory=dict
    )
    prices_file: Path | None = Field(
        default=None,
        description="A local price file in genai-prices' data format (its data.json), read at "
        "start: it overrides and extends the bundled prices. Nothing is downloaded.",
    )

    # Agent tasks
    max_concurrent_tasks: int = Field(default=2, ge=1, le=64)
    task_poll_interval_seconds: float = Field(default=0.5, gt=0, le=60)
    task_lease_seconds: float = Field(
        default=60.0, ge=5, description="A running task whose heartbeat is older is recovered."
    )
    task_test_timeout_seconds: float = Field(default=300.0, gt=0, le=7200)
    task_clone_timeout_seconds: float = Field(default=120.0, gt=0, le=3600)
    task_max_repo_mb: int = Field(default=500, ge=1, le=100_000)
    task_max_output_bytes: int = Field(default=256 * 1024, ge=1024, le=64 * 1024 * 1024)
    task_cpu_seconds: int = Field(default=600, ge=1)
    task_memory_mb: int = Field(default=4096, ge=64)
    task_network: bool = Field(
        default=False, description="Let test commands reach the network (cut off by default)."
    )
    workspace_root: Path | None = Field(default=None, description="Where task workspaces live.")
    keep_workspaces: bool = False
    examples_dir: Path = Field(
        default=DEFAULT_DATA_DIR / "examples",
        description="Where the bundled example repositories are created at start-up.",
    )
    secret_env_names: list[str] = Field(
        default_factory=list, description="Extra variable names never passed to test commands."
    )
    run_task_worker: bool = Field(default=True, description="Execute queued tasks in this process.")
    task_stop_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="A graceful stop waits this long for running tasks to requeue themselves "
        "(their commands are killed at once), then requeues the rest itself.",
    )

    # The sandbox of repository commands (app/sandbox): bubblewrap, a cgroup per command.
    sandbox_ro_paths: list[Path] | None = Field(
        default=None,
        description="Host paths a repository command sees, read-only (a JSON list); unset: the "
        "system's directories and the interpreter's installation.",
    )
    sandbox_tmp_mb: int = Field(
        default=256, ge=1, le=65_536, description="Size of a command's private /tmp (and /dev/shm)."
    )
    task_disk_mb: int = Field(
        default=1024,
        ge=16,
        le=1_048_576,
        description="What a test run may hold in its copy of the workspace (in memory, which "
        "TASK_MEMORY_MB also counts where cgroups work).",
    )
    task_max_processes: int = Field(
        default=512, ge=8, le=1_000_000, description="Processes and threads of a command at once."
    )

    @model_validator(mode="after")
    def _sandbox_paths_are_safe(self) -> Settings:
        """Refuse a read-only path that would show the sandbox the service's code, data or
        workspaces, host sockets or accounts: one of them, inside one, or an ancestor of one."""
        if self.sandbox_ro_paths is None:
            return self
        inside_refused = [
            BACKEND_DIR,
            DEFAULT_DATA_DIR,
            self.spool_dir,
            *map(Path, ("/proc", "/sys", "/dev", "/run", "/var/run", "/tmp")),  # noqa: S108
        ]
        above_refused = [
            *inside_refused,
            *map(Path, ("/root", "/home", "/etc/shadow", "/etc/gshadow")),
            *([self.workspace_root] if self.workspace_root else []),
        ]
        try:
            database = make_url(self.database_url).database
        except ArgumentError:
            database = None
        if self.database_url.startswith("sqlite") and database:
            above_refused.append(Path(database))
        for path in self.sandbox_ro_paths:
            if not path.is_absolute():
                raise ValueError(f"SANDBOX_RO_PATHS: {path} is not an absolute path")
            real = Path(os.path.realpath(path))
            for target in above_refused:
                target = Path(os.path.realpath(target))
                if real == target or real in target.parents:
                    raise ValueError(f"SANDBOX_RO_PATHS: {path} would show {target} to the sandbox")
            for target in inside_refused:
                if Path(os.path.realpath(target)) in real.parents:
                    raise ValueError(f"SANDBOX_RO_PATHS: {path} is inside {target}")
        return self

    # Budgets, enforced before each LLM call (app/budgets/guard.py). Amounts in USD, exact to
    # the picodollar; unset or empty = unlimited. Windows are UTC calendar days and months; a
    # task's budget covers its whole life. Per-user and per-task overrides: /api/v1/limits.
    budget_enforcement: bool = Field(
        default=True, description="Reserve each call's worst-case cost first; refuse over budget."
    )
    budget_task_max_usd: Decimal | None = Field(default=None, ge=0, le=1_000_000, decimal_places=12)
    budget_user_daily_usd: Decimal | None = Field(
        default=None, ge=0, le=1_000_000, decimal_places=12
    )
    budget_user_monthly_usd: Decimal | None = Field(
        default=None, ge=0, le=1_000_000, decimal_places=12
    )
    budget_global_daily_usd: Decimal | None = Field(
        default=None, ge=0, le=1_000_000, decimal_places=12
    )
    budget_soft_threshold: Decimal = Field(
        default=Decimal("0.8"), gt=0, le=1, decimal_places=4, description="Warn at this share."
    )
    budget_reservation_ttl_seconds: float = Field(
        default=3600.0,
        ge=60,
        description="A reservation older than this (its process died) is released.",
    )
    budget_default_max_output_tokens: int = Field(
        default=4096, ge=1, le=10_000_000, description="Reserved when a call sets no max_tokens."
    )

    @field_validator(
        "budget_task_max_usd",
        "budget_user_daily_usd",
        "budget_user_monthly_usd",
        "budget_global_daily_usd",
        mode="before",
    )
    @classmethod
    def _blank_budget_is_unlimited(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _reservations_outlive_calls(self) -> Settings:
        # A reservation released while its call is still running would let spend pass the cap.
        if self.budget_reservation_ttl_seconds < self.openai_timeout_seconds:
            raise ValueError("BUDGET_RESERVATION_TTL_SECONDS must be >= OPENAI_TIMEOUT_SECONDS")
        return self

    # Telemetry
    prometheus_multiproc_dir: Path | None = Field(
        default=None,
        description="prometheus_client's multiprocess mode: with several processes in one "
        "server (uvicorn --workers N, gunicorn) each keeps its metrics in files here and "
        "/metrics serves the server's sum. Must be in the environment when the server starts "
        "and emptied before each start (docs/DEPLOYMENT.md).",
    )
    enable_opentelemetry: bool = False
    otel_exporter_otlp_endpoint: str = "http://localhost:4317"
    otel_service_name: str = "asa-backend"
    otel_instrumentation_genai_capture_message_content: bool = False

    # Providers and GenAI telemetry (app/tracking/providers.py, app/tracking/semconv.py).
    llm_provider: str | None = Field(
        default=None,
        max_length=64,
        description="The provider serving OPENAI_BASE_URL (gen_ai.provider.name, e.g. "
        "anthropic, gcp.gemini, mistral_ai, deepseek, openrouter); unset: found from the "
        "endpoint URL, a provider/model prefix or the model name.",
    )
    otel_genai_deprecated_attributes: bool = Field(
        default=False,
        description="Also emit span attributes the GenAI conventions deprecated "
        "(gen_ai.system), for backends that still read them.",
    )

    # The OpenAI-compatible gateway at /v1 (app/gateway, docs/GATEWAY.md).
    gateway_routes: str | None = Field(
        default=None,
        description="The gateway's routing table as JSON (upstreams with their base URL and "
        "key, models, aliases, fallbacks); unset: every model goes to OPENAI_BASE_URL or the "
        "simulator.",
    )
    gateway_routes_file: Path | None = Field(
        default=None, description="The routing table in a JSON file (instead of GATEWAY_ROUTES)."
    )
    gateway_timeout_seconds: float = Field(
        default=600.0, gt=0, description="Per upstream attempt, unless its route says otherwise."
    )
    gateway_max_agent_labels: int = Field(
        default=50,
        ge=1,
        le=10_000,
        description="Distinct agents a process's metrics show; later new ones are 'other'.",
    )

    @property
    def gateway_routes_json(self) -> str | None:
        """The routing table's JSON text (the file wins over the variable)."""
        if self.gateway_routes_file is not None:
            return self.gateway_routes_file.read_text(encoding="utf-8")
        return self.gateway_routes

    # Access control (app/api/auth.py, app/api/guards.py). Keys: `asa keys create --user NAME`.
    bind_host: str = Field(
        default="127.0.0.1",
        description="The address the server listens on (`make run` passes HOST). With no API "
        "key the service runs open, and only on a loopback address.",
    )
    max_request_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=1024**3)
    task_submit_rate_per_minute: float = Field(
        default=30.0,
        ge=0,
        description="Task submissions per API key; 0: no limit. Shared by every process on "
        "PostgreSQL (rate_limit_buckets), per process on SQLite.",
    )
    task_submit_burst: int = Field(default=10, ge=1, le=10_000)
    metrics_token: SecretStr | None = Field(
        default=None, description="When set, /metrics requires `Authorization: Bearer <token>`."
    )

    # Fair sharing of the task queue (app/tasks/store.py: create_task, claim_next). Per user id,
    # whatever the role; the queue serves the user with the fewest running tasks first.
    task_max_running_per_user: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="Tasks of one user that run at once; unset: half of MAX_CONCURRENT_TASKS "
        "(at least 1), so one user never holds every worker.",
    )
    task_max_queued_per_user: int = Field(
        default=20,
        ge=1,
        le=100_000,
        description="Tasks one user may have waiting; a submission beyond it answers 429.",
    )

    @property
    def max_running_tasks_per_user(self) -> int:
        """TASK_MAX_RUNNING_PER_USER, or half of the workers (at least one) when unset."""
        if self.task_max_running_per_user is not None:
            return self.task_max_running_per_user
        return max(1, self.max_concurrent_tasks // 2)

    @field_validator("metrics_token", mode="before")
    @classmethod
    def _metrics_token_is_strong(cls, value: object) -> object:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, str) and not value.strip():
            return None
        if isinstance(value, str) and len(value) < 16:
            raise ValueError("METRICS_TOKEN must be at least 16 characters")
        return value

    @property
    def secret_values(self) -> tuple[str, ...]:
        """Every configured secret, masked wherever text leaves the process."""
        secrets = (self.openai_api_key, self.metrics_token, self.web_session_secret)
        values = [s.get_secret_value() for s in secrets if s]
        try:
            password = make_url(self.database_url).password
        except ArgumentError:  # not a URL: the engine will say so
            password = None
        if password:
            values.append(str(password))
        values.extend(_gateway_keys(self))
        return tuple(v for v in values if v)

    @field_validator("database_url")
    @classmethod
    def _normalize_postgres_driver(cls, value: str) -> str:
        # psycopg 3 is the driver we ship; plain postgresql:// would ask for psycopg2.
        for prefix in ("postgresql://", "postgres://"):
            if value.startswith(prefix):
                return "postgresql+psycopg://" + value[len(prefix) :]
        return value

    @field_validator("price_overrides", mode="before")
    @classmethod
    def _parse_price_overrides(cls, value: object) -> object:
        if isinstance(value, str):
            import json

            return json.loads(value) if value.strip() else {}
        return value

    @property
    def uses_simulator(self) -> bool:
        """True when no API key is configured: calls go to the built-in simulator."""
        return self.openai_api_key is None or not self.openai_api_key.get_secret_value()

    # The web console (app/web): its sign-in sessions, and links from LLM calls to their traces.
    web_session_secret: SecretStr | None = Field(
        default=None,
        description="Signs console session cookies and CSRF tokens (at least 32 characters); "
        "unset: a random secret generated once into WEB_SESSION_SECRET_FILE. Processes behind "
        "one address on different machines need the same value.",
    )
    web_session_secret_file: Path = Field(
        default=DEFAULT_DATA_DIR / "web_session_secret",
        description="Where the generated console secret is kept (mode 0600).",
    )
    web_session_hours: float = Field(
        default=12.0, gt=0, le=24 * 30, description="A console sign-in lasts this long."
    )
    web_cookie_secure: bool | None = Field(
        default=None,
        description="Mark console cookies Secure; unset: when the request came over https.",
    )
    jaeger_ui_url: str | None = Field(
        default=None,
        pattern=r"^https?://\S+$",
        description="Jaeger's UI (e.g. http://localhost:16686): the console links each LLM "
        "call to its trace.",
    )

    # -- Notifications (app/notifications; docs/NOTIFICATIONS.md) -----------------------------
    notifications_dispatcher: bool = Field(
        default=True,
        description="Deliver the outbox's notifications from this process (a background thread).",
    )
    notification_poll_interval_seconds: float = Field(default=1.0, gt=0, le=300)
    notification_batch_size: int = Field(default=50, ge=1, le=1000)
    notification_concurrency: int = Field(
        default=4, ge=1, le=64, description="Deliveries sent at once by one dispatcher."
    )
    notification_max_attempts: int = Field(
        default=8, ge=1, le=100, description="Tries of a delivery before it is a dead letter."
    )
    notification_backoff_base_seconds: float = Field(
        default=5.0, gt=0, le=3600, description="Wait after the first failure; doubles each try."
    )
    notification_backoff_max_seconds: float = Field(default=3600.0, gt=0, le=86_400)
    notification_send_timeout_seconds: float = Field(
        default=10.0, gt=0, le=300, description="Connect, send and answer of one delivery."
    )
    notification_lease_seconds: float = Field(
        default=120.0,
        ge=1,
        le=3600,
        description="A delivery claimed by a dispatcher that died is sent again after this.",
    )
    notification_unpriced_scan_seconds: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="How often models without a price are looked for.",
    )

    @model_validator(mode="after")
    def _notification_lease_outlives_a_send(self) -> Settings:
        # SMTP connects, greets, logs in and sends, each bounded by the timeout.
        if self.notification_lease_seconds < 4 * self.notification_send_timeout_seconds:
            raise ValueError(
                "NOTIFICATION_LEASE_SECONDS must be >= 4 x NOTIFICATION_SEND_TIMEOUT_SECONDS"
            )
        return self

    # -- Spend insights (app/usage/anomalies.py, recommendations.py; docs/NOTIFICATIONS.md) --
    insights_scan_seconds: float = Field(
        default=300.0,
        gt=0,
        le=86_400,
        description="How often the dispatcher looks for spend anomalies and forecasts over "
        "a monthly budget.",
    )
    anomaly_baseline_hours: int = Field(
        default=168, ge=24, le=24 * 28, description="Trailing hours an hour is compared with."
    )
    anomaly_min_active_hours: int = Field(
        default=8, ge=3, le=24 * 28, description="Active hours a baseline needs to judge."
    )
    anomaly_threshold: float = Field(
        default=6.0, gt=0, le=1000, description="Robust z-score (MAD units) that is anomalous."
    )
    anomaly_min_excess_usd: Decimal = Field(
        default=Decimal("1"), ge=0, le=1_000_000, decimal_places=6,
        description="An hour must also exceed the baseline median by this much.",
    )  # fmt: skip
    recommendation_min_tasks: int = Field(
        default=20, ge=1, le=100_000, description="Finished tasks a model needs to be compared."
    )
    recommendation_cache_seconds: float = Field(
        default=300.0,
        ge=0,
        le=86_400,
        description="How long a recommendations answer is reused (0: never).",
    )

    # -- end of notifications ---------------------------------------------------------------


def _gateway_keys(settings: Settings) -> list[str]:
    """The upstream keys of the gateway's routing table: secrets like OPENAI_API_KEY."""
    import json

    try:
        text = settings.gateway_routes_json
        table = json.loads(text) if text else {}
        upstreams = table.get("upstreams", {}) if isinstance(table, dict) else {}
        return [
            str(u["api_key"])
            for u in upstreams.values()
            if isinstance(u, dict) and isinstance(u.get("api_key"), str) and u["api_key"]
        ]
    except (OSError, ValueError, AttributeError):
        return []  # the gateway refuses the table at start-up and says why


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()
