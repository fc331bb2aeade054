"""Shared fixtures: real PostgreSQL and Redis servers, isolated per test run.

PostgreSQL isolation: each database fixture gets its own schema (``search_path``) in the
``test`` database, dropped afterwards, so parallel runs on one server never collide.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from kvtest.services import REDIS_URL, PgSchema


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
