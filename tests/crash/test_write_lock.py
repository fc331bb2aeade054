"""A read-then-write under the quota guard is atomic across processes, on SQLite too: while
one gateway holds a tenant's guard (its quota check and its insert to come), another
gateway's extend of the same cache cannot slip in between (SQLite and PostgreSQL). Two
:class:`Database` objects and two services stand for two gateway processes."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from kvaas.db.models import CacheVersion
from kvaas.db.session import Database
from kvaas.services.caches import CacheService

from .conftest import World


async def test_another_process_cannot_extend_while_the_guard_is_held(world: World) -> None:
    w = world
    cache = await w.seed({1: "ready"})
    other_db = Database(w.db.url, timeout=0.5)  # the other gateway gives up after 0.5 s
    other = CacheService(w.service.settings, w.store, None, other_db)
    try:
        async with w.db.session() as mine, w.service._quota_guard(mine, w.tenant):
            # the other gateway's extend runs to its end while this one holds the guard
            async with other_db.session() as theirs:
                row = await theirs.get(type(cache), cache.id)
                assert row is not None
                with pytest.raises(Exception, match=r"locked|timeout|unavailable|cancel"):
                    await other._begin_extend(theirs, w.tenant, row, list(range(64)), 32, 0)
            pending = await mine.scalar(
                select(CacheVersion.version).where(
                    CacheVersion.cache_id == cache.id, CacheVersion.status == "pending"
                )
            )
            assert pending is None  # nothing slipped in: this check-then-write holds
            await mine.commit()
    finally:
        await other_db.dispose()
