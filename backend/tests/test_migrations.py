from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect

from app.models import Base


def test_migrations_build_every_model_table(engine: Engine) -> None:
    tables = set(inspect(engine).get_table_names())
    assert set(Base.metadata.tables) <= tables


def test_llm_usage_request_id_is_unique(engine: Engine) -> None:
    uniques = inspect(engine).get_unique_constraints("llm_usage")
    assert any(u["column_names"] == ["request_id"] for u in uniques)


def test_models_and_migrations_agree(engine: Engine) -> None:
    """What ``alembic check`` verifies: autogenerate finds nothing to add, drop or alter."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
