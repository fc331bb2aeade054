"""Fixtures of the metering and billing tests: a migrated database (SQLite and PostgreSQL),
tenants, and cache objects as the cache service holds them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from kvaas.db import migrate
from kvaas.db.models import Cache, Tenant
from kvaas.db.session import Database


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    migrate.upgrade(database_url)
    database = Database(database_url)
    try:
        yield database
    finally:
        await database.dispose()


@pytest.fixture
def make_tenant(db: Database) -> Callable[..., Any]:
    async def make(name: str) -> Tenant:
        async with db.session() as s:
            t = Tenant(name=name)
            s.add(t)
            await s.commit()
            return t

    return make


def _cache_obj(
    tenant_id: str,
    cache_id: str,
    tokens: int,
    storage_class: str = "standard",
    *,
    stored_bytes: int = 0,
    version: int = 1,
) -> Cache:
    """A cache object as the cache service holds it (not stored: the ledger needs no row)."""
    return Cache(
        id=cache_id,
        tenant_id=tenant_id,
        tokens=tokens,
        storage_class=storage_class,
        stored_bytes=stored_bytes,
        version=version,
        expires_at=datetime(2100, 1, 1, tzinfo=UTC),
    )


@pytest.fixture
def cache_obj() -> Callable[..., Cache]:
    """``cache_obj(tenant_id, cache_id, tokens, storage_class="standard", ...)``."""
    return _cache_obj
