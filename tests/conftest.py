"""Shared fixtures: real PostgreSQL and Redis servers, isolated per test run.

PostgreSQL isolation: each database fixture gets its own schema (``search_path``) in the
``test`` database, dropped afterwards, so parallel runs on one server never collide.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

POSTGRES_URL = os.environ.get(
    "KVAAS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("KVAAS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _libpq_url(sqlalchemy_url: str) -> str:
    return sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)


def _with_search_path(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}')}"


class PgSchema:
    """A throw-away PostgreSQL schema; ``url`` points SQLAlchemy at it."""

    def __init__(self) -> None:
        self.name = f"kvaas_t_{secrets.token_hex(6)}"
        with psycopg.connect(_libpq_url(POSTGRES_URL), autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{self.name}"')
        self.url = _with_search_path(POSTGRES_URL, self.name)

    def drop(self) -> None:
        with psycopg.connect(_libpq_url(POSTGRES_URL), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE')


@pytest.fixture
def pg_schema() -> Iterator[PgSchema]:
    schema = PgSchema()
    try:
        yield schema
    finally:
        schema.drop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each supported kind (not migrated)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'kvaas.db'}"
    else:
        schema = PgSchema()
        try:
            yield schema.url
        finally:
            schema.drop()


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture
async def anyio_backend() -> AsyncIterator[str]:
    yield "asyncio"
