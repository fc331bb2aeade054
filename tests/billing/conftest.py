"""The metering fixtures (a migrated database on SQLite and PostgreSQL, tenants, cache
objects), a gateway without an engine, and the worked example of ``docs/billing.md``."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from kvtest.ledger_db import _cache_obj, cache_obj, db, make_tenant

from kvaas.db.models import Tenant
from kvaas.db.session import Database

__all__ = ["cache_obj", "db", "make_tenant"]


@pytest.fixture
def make_app(database_url: str, tmp_path: Any) -> Callable[..., Any]:
    """``async with make_app(**settings) as (app, client)``: a gateway (no engine) on the
    migrated test database."""
    from contextlib import asynccontextmanager

    from kvtest.gateway import running_app

    @asynccontextmanager
    async def factory(**overrides: Any) -> Any:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "database_url": database_url,
            "rate_limit_per_second": 0,
        }
        async with running_app(**{**values, **overrides}) as (app, c):
            yield app, c

    return factory


@pytest.fixture
def make_keyed_tenant(db: Database) -> Callable[..., Any]:
    """``await make_keyed_tenant(name)`` → (tenant, API key)."""
    from kvaas.auth.tenancy import Actor, create_tenant

    async def make(name: str) -> tuple[Tenant, str]:
        async with db.session() as s:
            tenant, key = await create_tenant(s, Actor("test"), name)
            assert key is not None
            return tenant, key

    return make


EXAMPLE_START = datetime(2026, 10, 5, 10, 0, tzinfo=UTC)


async def seed_example(db: Database, tenant_id: str, cache_id: str = "cache_example") -> None:
    """The example of ``docs/billing.md``: a cache of 100,000 tokens kept 3 hours in
    ``standard`` and attached 20 times (each attach: 100,000 cached tokens, a 500-token
    question, 200 output tokens), in October 2026. Calling it again replays the same events."""
    from datetime import timedelta

    from kvaas.metering import hooks

    cache = _cache_obj(tenant_id, cache_id, 100_000, "standard", stored_bytes=52_000_000)
    async with db.session() as s:
        await hooks.on_create(s, cache, 100_000, f"req_create_{cache_id}", EXAMPLE_START)
        await hooks.on_cache_ready(s, cache, EXAMPLE_START)
        await s.commit()
    for i in range(20):
        async with db.session() as s:
            await hooks.on_attach(
                s,
                cache,
                cached_tokens=100_000,
                prefill_tokens=500,
                output_tokens=200,
                request_id=f"req_attach_{cache_id}_{i}",
                at=EXAMPLE_START + timedelta(minutes=5 + i),
            )
            await s.commit()
    async with db.session() as s:
        await hooks.on_cache_ended(s, cache, "deleted", EXAMPLE_START + timedelta(hours=3))
        await s.commit()


@pytest.fixture
def seed(db: Database) -> Callable[..., Any]:
    async def run(tenant_id: str, cache_id: str = "cache_example") -> None:
        await seed_example(db, tenant_id, cache_id)

    return run
