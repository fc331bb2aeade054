"""Storage is billed on the tier that really keeps a cache's chunks: a ``standard`` write that
spilled to disk (Redis down or full) and an idle demotion to disk move the billed bytes from
Redis to disk, from the time of the move. Real store (Redis, files), real database (SQLite and
PostgreSQL)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from kvtest.services import REDIS_URL
from store.conftest import Tenant as StoreTenant
from store.conftest import cleanup_prefix, fast_breaker
from store.conftest import private_redis as private_redis  # the fixture

from kvaas.db.base import utcnow
from kvaas.db.models import Cache
from kvaas.db.session import Database
from kvaas.metering.hooks import on_cache_ready
from kvaas.metering.storage import epoch_s, meter_usage
from kvaas.metering.tiers import TierBilling
from kvaas.store import (
    DiskTier,
    RedisConnection,
    RedisRefIndex,
    RedisTier,
    TieredStore,
)
from kvaas.store.errors import StorageFull


@pytest.fixture
async def redis_store(tmp_path: Path) -> AsyncIterator[TieredStore]:
    prefix = f"kvt-{secrets.token_hex(4)}"
    conn = RedisConnection(REDIS_URL, prefix=prefix, breaker=fast_breaker())
    store = TieredStore(
        [RedisTier(conn), DiskTier(tmp_path / "disk", 8 << 20, durable=False)],
        RedisRefIndex(conn),
        encrypted=False,
    )
    await store.open()
    yield store
    await store.close()
    await cleanup_prefix(REDIS_URL, prefix)


@pytest.fixture
async def full_redis_store(
    tmp_path: Path, private_redis: Callable[..., Any]
) -> AsyncIterator[TieredStore]:
    """A store on a private Redis filled to its ``maxmemory`` (``noeviction``)."""
    server = private_redis("--maxmemory", "3mb", "--maxmemory-policy", "noeviction")
    conn = RedisConnection(server.url, breaker=fast_breaker())
    store = TieredStore(
        [RedisTier(conn), DiskTier(tmp_path / "disk", 8 << 20, durable=False)],
        RedisRefIndex(conn),
        encrypted=False,
    )
    await store.open()
    filler = StoreTenant()
    # Redis refuses a write while its memory is over maxmemory, counting the request's own
    # buffer: after a large write's refusal, 4 KB ones still fitted in some runs; fill with
    # small chunks too, until none fits
    for size, n in ((1 << 17, 40), (1 << 10, 4000)):
        with pytest.raises(StorageFull):
            for i in range(n):
                await store.tier("redis").put_many(filler.chunks(1, size=size, start=i + n))
    yield store
    await store.close()


async def _create(
    db: Database, store: TieredStore, tenant: Any, st: StoreTenant, started_ago_s: int
) -> tuple[Cache, int]:
    """A ready ``standard`` cache whose 3 chunks are written through the store; its storage
    recorded as started ``started_ago_s`` seconds ago with the default tiers (Redis)."""
    chunks = st.chunks(3, size=4000)
    keys = [k for k, _ in chunks]
    now = utcnow()
    ids = b"\0" * 4 * 48
    async with db.session() as s:
        cache = Cache(
            tenant_id=tenant.id,
            model="tiny",
            model_fingerprint="f" * 32,
            status="ready",
            version=1,
            tokens=48,
            token_ids=ids,
            prefix_sha256="0" * 64,
            chunk_tokens=16,
            stored_chunks=3,
            stored_bytes=0,
            scheme="none",
            storage_class="standard",
            meta={},
            expires_at=now + timedelta(days=1),
        )
        s.add(cache)
        await s.flush()
        await store.put_manifest(st.manifest(keys, cache_id=cache.id))
        await store.put_chunks(chunks, "standard")
        size = sum((await store.bytes_by_tier(keys)).values())
        cache.stored_bytes = size
        await on_cache_ready(s, cache, now - timedelta(seconds=started_ago_s))
        await s.commit()
    return cache, size


def cache_keys(store: TieredStore, st: StoreTenant) -> list[Any]:
    return [k for k, _ in st.chunks(3, size=4000)]


async def _billed(db: Database, tenant_id: str) -> dict[str, int]:
    now = utcnow()
    async with db.session() as s:
        u = await meter_usage(s, tenant_id, now - timedelta(hours=1), now + timedelta(hours=1))
    return {k: v for k, v in u.stored_byte_seconds.items() if v}


async def test_idle_demotion_moves_billing_to_disk(
    db: Database, make_tenant: Callable[..., Any], redis_store: TieredStore
) -> None:
    tenant = await make_tenant("t")
    st = StoreTenant()
    billing = TierBilling(db, redis_store, lambda t: st.slot)
    await billing.sync_round()
    _, size = await _create(db, redis_store, tenant, st, started_ago_s=600)
    assert await billing.sync_round() == 0  # written where its class lives: nothing to correct
    moved_at = epoch_s(utcnow())
    assert await redis_store.demote_idle(0) == 3
    assert await billing.sync_round() == 1
    assert await billing.sync_round() == 0  # once
    billed = await _billed(db, tenant.id)
    start = epoch_s(utcnow() - timedelta(hours=1))
    # Redis from the start until the move (600 s ago .. now), disk from the move on
    assert 600 * size <= billed["redis"] <= (600 + 30) * size
    end = epoch_s(utcnow() + timedelta(hours=1))
    assert billed["disk"] >= (end - moved_at - 30) * size
    assert start < moved_at


async def test_a_spilled_create_is_billed_on_disk_from_its_start(
    db: Database, make_tenant: Callable[..., Any], full_redis_store: TieredStore
) -> None:
    """Redis full at create: the chunks spilled to disk; the create's lifecycle event said
    Redis (the class's default); billing charges disk from the start, Redis never."""
    tenant = await make_tenant("t")
    st = StoreTenant()
    billing = TierBilling(db, full_redis_store, lambda t: st.slot)
    await billing.sync_round()
    _, size = await _create(db, full_redis_store, tenant, st, started_ago_s=0)
    assert await full_redis_store.bytes_by_tier(cache_keys(full_redis_store, st)) == {"disk": size}
    assert size > 0
    assert await billing.sync_round() == 1
    billed = await _billed(db, tenant.id)
    assert "redis" not in billed and billed["disk"] >= 3000 * size  # the hour ahead, on disk
