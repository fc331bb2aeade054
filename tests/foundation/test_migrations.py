"""Migrations upgrade and downgrade on SQLite and PostgreSQL, and match the models."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from kvaas.db import migrate
from kvaas.db.base import Base
from kvaas.db.session import sync_url


def _tables(url: str) -> set[str]:
    engine = create_engine(sync_url(url))
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_then_downgrade_each_step(database_url: str) -> None:
    revisions = migrate.all_revisions()
    assert revisions[-1] == migrate.head_revision()
    migrate.upgrade(database_url)
    assert migrate.current_revision(database_url) == migrate.head_revision()
    assert _tables(database_url) == set(Base.metadata.tables)
    # step down one revision at a time, then all the way up again
    for expected in reversed([None, *revisions[:-1]]):
        migrate.downgrade(database_url, "-1")
        assert migrate.current_revision(database_url) == expected
    assert _tables(database_url) == set()
    migrate.upgrade(database_url)
    migrate.upgrade(database_url)  # idempotent
    assert migrate.current_revision(database_url) == migrate.head_revision()


def test_models_match_migrations(database_url: str) -> None:
    """Autogenerate finds nothing to do: the models and the migrations agree."""
    migrate.upgrade(database_url)
    engine = create_engine(sync_url(database_url))
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()
    assert diff == []
