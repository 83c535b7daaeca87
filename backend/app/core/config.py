"""Configuration: the one place that reads the environment.

Every variable is documented in the top-level ``.env.example``; names are the upper-case
field names.
"""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

BACKEND_DIR = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = BACKEND_DIR / "data"


class Settings(BaseSettings):
    """Typed settings read from the environment (and an optional ``.env`` file)."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

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

    # Telemetry
    enable_opentelemetry: bool = False
    otel_exporter_otlp_endpoint: str = "http://localhost:4317"
    otel_service_name: str = "asa-backend"
    otel_instrumentation_genai_capture_message_content: bool = False

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


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()
