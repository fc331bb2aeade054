"""Attaches hold no database connection while the engine runs: more concurrent streaming
attaches than the connection pool holds all start and complete, each recorded once.

A request's session opens its transaction with its first query (the API key lookup), as the
API's routes do. The cache service here runs with the real engine and store of the session's
gateway, on a database of its own: PostgreSQL (the gateway's schema) with a pool of 2 + 2
connections, or a SQLite file (its pool: 5 + 10) holding a copy of the tenant and the cache."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, select

from kvaas.db import migrate
from kvaas.db.models import Cache, CacheVersion, Tenant
from kvaas.db.session import Database
from kvaas.engine import Generation, Sampling
from kvaas.services.caches import CacheRef, CacheService, Prompt
from kvaas.services.fairness import FairGate

from .conftest import Gateway

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


async def _copy_cache(src: Database, dst: Database, cache_id: str) -> None:
    """Copy the cache ``cache_id``, its versions and its tenant from ``src`` to ``dst``."""
    async with src.session() as s:
        cache = await s.get(Cache, cache_id)
        assert cache is not None
        tenant = await s.get(Tenant, cache.tenant_id)
        found = await s.execute(select(CacheVersion).where(CacheVersion.cache_id == cache_id))
        rows = [tenant, cache, *found.scalars()]
        copies = [
            (type(o), {a.key: getattr(o, a.key) for a in inspect(o).mapper.column_attrs})
            for o in rows
        ]
    async with dst.session() as d:
        for model, values in copies:
            d.add(model(**values))
            await d.flush()
        await d.commit()


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
async def test_more_open_streams_than_pool_connections(
    gateway: Gateway, dialect: str, tmp_path: Path
) -> None:
    ids = [(11 * i + 5) % 700 + 20 + len(dialect) for i in range(300)]
    r = await gateway.client.post(
        "/v1/cache/create", json={"token_ids": ids, "compression": "none"}, headers=gateway.auth()
    )
    assert r.status_code == 201, r.text
    cache_id = r.json()["id"]
    s = gateway.settings
    base = gateway.app.state.cache_service
    if dialect == "postgresql":
        db = Database(s.resolved_database_url, pool_size=2, timeout=2.0)  # 4 connections
        streams_n = 12
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'attach.db'}"
        await asyncio.to_thread(migrate.upgrade, url)
        db = Database(url, timeout=2.0)  # SQLAlchemy's pool: 15 connections
        await _copy_cache(base.db, db, cache_id)
        streams_n = 18
    settings = s.model_copy(update={"tenant_max_inflight": streams_n, "tenant_max_queued": 4})
    service = CacheService(settings, base.store, base.engine, db, FairGate.from_settings(settings))
    async with db.session() as session:
        found = await session.execute(select(Cache.tenant_id).where(Cache.id == cache_id))
        tenant_id = found.scalar_one()
    streams: list[Any] = []
    try:
        async with AsyncExitStack() as stack:
            for _ in range(streams_n):
                session = await stack.enter_async_context(db.session())
                tenant = await session.get(Tenant, tenant_id)  # the request's key lookup
                assert tenant is not None
                _, deltas = await service.attach_stream(
                    session,
                    tenant,
                    CacheRef(cache_id=cache_id),
                    Prompt(token_ids=[5, 6, 7]),
                    Sampling(max_tokens=4, temperature=0.0),
                )
                first: Generation = await anext(deltas)  # started: it holds its engine slot
                assert first.token_ids
                streams.append(deltas)
            assert len(streams) == streams_n  # all open at once, beyond the pool
            for deltas in streams:
                async for _ in deltas:
                    pass
        await service.drain()  # the usage recordings of the ended streams
        async with db.session() as session:
            cache = await session.get(Cache, cache_id)
            assert cache is not None and cache.hit_count == streams_n  # each recorded once
    finally:
        await db.dispose()
