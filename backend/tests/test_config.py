"""Settings: the environment is read in one place, and .env.example documents all of it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.core.config import Settings

ENV_EXAMPLE = Path(__file__).resolve().parents[2] / ".env.example"


def documented() -> set[str]:
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), re.MULTILINE))


def test_every_setting_is_in_env_example_and_nothing_else() -> None:
    fields = {name.upper() for name in Settings.model_fields}
    assert fields == documented()


def test_env_example_as_is_gives_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(ENV_EXAMPLE.read_text())

    loaded = Settings()

    assert loaded == Settings(_env_file=None)  # type: ignore[call-arg]
    assert loaded.uses_simulator and loaded.database_url.startswith("sqlite:///")


def test_postgres_urls_use_psycopg3() -> None:
    assert (
        Settings(database_url="postgresql://u@h/db").database_url == "postgresql+psycopg://u@h/db"
    )


def test_unsafe_values_are_refused() -> None:
    with pytest.raises(ValidationError):
        Settings(max_concurrent_tasks=0)
    with pytest.raises(ValidationError):
        Settings(openai_max_retries=-1)
