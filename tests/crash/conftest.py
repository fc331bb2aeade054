"""Fixtures of the crash-consistency tests without an engine: the cache service on a real
database (SQLite and PostgreSQL) and a real embedded store (disk tier, SQLite reference
index), and caches seeded as a create or extend leaves them (rows plus stored manifests).

Interleavings are driven deterministically: :class:`Hook` runs a competing transaction inside
one store call of the operation under test (the store itself is real; only the moment is
chosen)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from kvtest.services import REDIS_URL

from kvaas.config import Settings
from kvaas.db import migrate
from kvaas.db.base import utcnow
from kvaas.db.models import Cache, CacheVersion, Tenant
from kvaas.db.session import Database
from kvaas.services.caches import CacheService, tokens_to_bytes
from kvaas.services.caches.identity import PrefillJob, prefix_sha256
from kvaas.store.factory import StoreConfig, build_store
from kvaas.store.redis_conn import RedisConnection
from kvaas.store.tiered import TieredStore

CHUNK = 16


@dataclass
class World:
    db: Database
    store: TieredStore
    service: CacheService
    tenant: Tenant

    async def seed(
        self,
        versions: dict[int, str],
        *,
        status: str = "ready",
        tokens_per_version: int = 32,
        tenant: Tenant | None = None,
    ) -> Cache:
        """A cache of ``tenant`` (the world's by default) with ``versions`` ({number:
        status}); version ``n`` holds ``n * tokens_per_version`` tokens; a manifest is stored
        for every ready or pending version of a cache of the world's tenant (rows only for
        another). The cache row describes the latest ready version (or version 1)."""
        owner = tenant or self.tenant
        now = utcnow()
        latest = max((v for v, st in versions.items() if st == "ready"), default=1)
        ids = list(range(latest * tokens_per_version))
        async with self.db.session() as s:
            cache = Cache(
                tenant_id=owner.id,
                model="tiny",
                model_fingerprint="f" * 32,
                status=status,
                version=latest,
                tokens=len(ids),
                token_ids=tokens_to_bytes(ids),
                prefix_sha256=prefix_sha256(ids),
                chunk_tokens=CHUNK,
                stored_chunks=len(ids) // CHUNK,
                stored_bytes=0,
                scheme="int4",
                storage_class="standard",
                meta={},
                hit_count=0,
                ttl_seconds=3600,
                expires_at=now + timedelta(hours=1),
                created_at=now,
            )
            s.add(cache)
            await s.flush()
            for v, st in versions.items():
                vids = list(range(v * tokens_per_version))
                s.add(
                    CacheVersion(
                        cache_id=cache.id,
                        version=v,
                        status=st,
                        tokens=len(vids),
                        token_ids=tokens_to_bytes(vids),
                        prefix_sha256=prefix_sha256(vids),
                        chunks=len(vids) // CHUNK,
                        stored_bytes=0,
                        created_at=now,
                        lease_expires_at=now + timedelta(minutes=5) if st == "pending" else None,
                    )
                )
            await s.commit()
        for v, st in versions.items():
            if st in ("ready", "pending") and owner is self.tenant:
                await self.store.put_manifest(self.job(cache, v).manifest())
        return cache

    def job(self, cache: Cache, version: int, tokens_per_version: int = 32) -> PrefillJob:
        ids = list(range(version * tokens_per_version))
        job = self.service._job(self.tenant, cache, version, ids)
        job.keys = self.service._cache_keys(self.tenant, cache, ids, None)
        return job

    @property
    def slot(self) -> str:
        return self.service._slot(self.tenant)

    async def stored_versions(self, cache_id: str) -> list[int]:
        return await self.store.list_versions(self.slot, cache_id)

    async def row(self, cache_id: str) -> Cache:
        async with self.db.session() as s:
            c = await s.get(Cache, cache_id)
            assert c is not None
            return c

    async def version_status(self, cache_id: str) -> dict[int, str]:
        from sqlalchemy import select

        async with self.db.session() as s:
            rows = await s.execute(
                select(CacheVersion.version, CacheVersion.status).where(
                    CacheVersion.cache_id == cache_id
                )
            )
            return {v: st for v, st in rows.all()}


class Hook:
    """Runs ``action`` once, inside the first call of ``store.<method>`` (before or after the
    real call), while the operation under test waits for the store."""

    def __init__(
        self,
        store: TieredStore,
        method: str,
        action: Callable[[], Awaitable[Any]],
        *,
        after: bool = False,
    ) -> None:
        self.fired = False
        self.result: Any = None
        real = getattr(store, method)

        async def hooked(*args: Any, **kwargs: Any) -> Any:
            if self.fired:
                return await real(*args, **kwargs)
            self.fired = True
            if not after:
                self.result = await action()
            out = await real(*args, **kwargs)
            if after:
                self.result = await action()
            return out

        setattr(store, method, hooked)


@asynccontextmanager
async def _world(
    database_url: str, tmp_path: Path, redis_prefix: str | None
) -> AsyncIterator[World]:
    migrate.upgrade(database_url)
    db = Database(database_url)
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=tmp_path / "data",
        database_url=database_url,
        engine="none",
        chunk_tokens=CHUNK,
    )
    store = build_store(
        StoreConfig(
            memory_bytes=0,
            disk_dir=tmp_path / "disk",
            disk_bytes=64 * 1024 * 1024,
            redis_url=REDIS_URL if redis_prefix else None,
            redis_prefix=redis_prefix or "kvaas",
        )
    )
    await store.open()
    service = CacheService(settings, store, None, db)
    async with db.session() as s:
        tenant = Tenant(name="acme")
        s.add(tenant)
        await s.commit()
    try:
        yield World(db, store, service, tenant)
    finally:
        await store.close()
        await db.dispose()
        if redis_prefix:
            conn = RedisConnection(REDIS_URL, prefix=redis_prefix)
            try:
                for name in await conn.scan_keys(f"{redis_prefix}:*"):
                    await conn.run(lambda c, n=name: c.delete(n))
            finally:
                await conn.close()


@pytest.fixture
async def world(database_url: str, tmp_path: Path) -> AsyncIterator[World]:
    """The service on an embedded store: disk tier, SQLite reference index."""
    async with _world(database_url, tmp_path, None) as w:
        yield w
