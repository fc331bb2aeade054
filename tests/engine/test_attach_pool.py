"""Attaches hold no database connection while the engine runs: more concurrent streaming
attaches than the connection pool holds all start and complete, each recorded once.

A request's session opens its transaction with its first query (the API key lookup), as the
API's routes do; the cache service here runs on a database whose pool has 2 + 2 connections
and a short wait, with the real engine and store of the session's gateway."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import pytest
from sqlalchemy import select

from kvaas.db.models import Cache, Tenant
from kvaas.db.session import Database
from kvaas.engine import Generation, Sampling
from kvaas.services.caches import CacheRef, CacheService, Prompt
from kvaas.services.fairness import FairGate

from .conftest import Gateway

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

POOL = 2  # pool_size; with as many in overflow, 4 connections at most
STREAMS = 12


async def test_more_open_streams_than_pool_connections(gateway: Gateway) -> None:
    ids = [(11 * i + 5) % 700 + 20 for i in range(300)]
    r = await gateway.client.post(
        "/v1/cache/create", json={"token_ids": ids, "compression": "none"}, headers=gateway.auth()
    )
    assert r.status_code == 201, r.text
    cache_id = r.json()["id"]
    s = gateway.settings
    settings = s.model_copy(update={"tenant_max_inflight": STREAMS, "tenant_max_queued": STREAMS})
    db = Database(s.resolved_database_url, pool_size=POOL, timeout=2.0)
    base = gateway.app.state.cache_service
    service = CacheService(settings, base.store, base.engine, db, FairGate.from_settings(settings))
    async with db.session() as session:
        tenant_id = (
            await session.execute(select(Cache.tenant_id).where(Cache.id == cache_id))
        ).scalar_one()
    streams: list[Any] = []
    try:
        async with AsyncExitStack() as stack:
            for _ in range(STREAMS):
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
            assert len(streams) == STREAMS  # all open at once, 3x the pool
            for deltas in streams:
                async for _ in deltas:
                    pass
        await service.drain()  # the usage recordings of the ended streams
        async with db.session() as session:
            cache = await session.get(Cache, cache_id)
            assert cache is not None and cache.hit_count == STREAMS  # each recorded once
    finally:
        await db.dispose()
