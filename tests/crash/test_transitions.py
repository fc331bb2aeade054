"""Every lifecycle transition is conditional: a competing transaction committed while the
transition waits for the store is never overwritten (SQLite and PostgreSQL). Each test drives
the interleaving with :class:`Hook`: the competitor runs inside the transition's store call."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from kvaas.db.base import utcnow
from kvaas.db.models import Cache, CacheLifecycleEvent, CacheVersion
from kvaas.errors import NotFound
from kvaas.services.caches import STALE_REASON, CachePatch

from .conftest import Hook, World


async def _delete(w: World, cache_id: str) -> None:
    async with w.db.session() as s:
        await w.service.delete(s, w.tenant, cache_id)


async def _events(w: World, cache_id: str) -> list[str]:
    async with w.db.session() as s:
        rows = await s.execute(
            select(CacheLifecycleEvent.kind)
            .where(CacheLifecycleEvent.cache_id == cache_id)
            .order_by(CacheLifecycleEvent.id)
        )
        return list(rows.scalars())


async def test_delete_while_a_create_completes_is_not_undone(world: World) -> None:
    """The delete commits while the completing prefill measures its bytes in the store: the
    cache stays deleted (never back to ``ready``) and its manifest is released."""
    w = world
    cache = await w.seed({1: "pending"}, status="pending")
    Hook(w.store, "sizes_many", lambda: _delete(w, cache.id))
    async with w.db.session() as s:
        with pytest.raises(NotFound):
            await w.service._complete(s, w.job(cache, 1), 1000, 32)
    row = await w.row(cache.id)
    assert row.status == "deleted"
    assert await w.version_status(cache.id) == {1: "deleted"}
    assert await w.stored_versions(cache.id) == []
    assert "started" not in await _events(w, cache.id)


async def test_a_version_failed_while_its_prefill_completes_stays_failed(world: World) -> None:
    """The sweep fails a version (its lease ran out) while the prefill completes: the version
    stays failed and released, the cache does not become ready on released chunks."""
    w = world
    cache = await w.seed({1: "pending"}, status="pending")

    async def fail() -> None:
        async with w.db.session() as s:
            await w.service._fail(s, w.job(cache, 1), STALE_REASON)

    Hook(w.store, "sizes_many", fail)
    async with w.db.session() as s:
        with pytest.raises(NotFound):
            await w.service._complete(s, w.job(cache, 1), 1000, 32)
    assert (await w.row(cache.id)).status == "failed"
    assert await w.version_status(cache.id) == {1: "failed"}
    assert await w.stored_versions(cache.id) == []


async def test_version_delete_racing_an_extend_keeps_the_extend(world: World) -> None:
    """The latest ready version (2) is deleted while version 3's extend completes: the cache
    ends at version 3 (the extend's update is not lost), versions 1 and 3 ready."""
    w = world
    cache = await w.seed({1: "ready", 2: "ready", 3: "pending"})

    async def complete_v3() -> None:
        async with w.db.session() as s:
            await w.service._complete(s, w.job(cache, 3), 3000, 32)

    Hook(w.store, "sizes_many", complete_v3)
    async with w.db.session() as s:
        await w.service.delete_version(s, w.tenant, cache.id, 2)
    row = await w.row(cache.id)
    assert (row.version, row.tokens, row.status) == (3, 96, "ready")
    assert await w.version_status(cache.id) == {1: "ready", 2: "deleted", 3: "ready"}
    assert await w.stored_versions(cache.id) == [1, 3]


async def test_class_change_racing_a_delete_reports_the_delete(world: World) -> None:
    """The cache is deleted while its chunks move to another class: the change answers 404
    and records no class change after the cache ended."""
    w = world
    cache = await w.seed({1: "ready"})
    Hook(w.store, "set_storage_class", lambda: _delete(w, cache.id), after=True)
    async with w.db.session() as s:
        with pytest.raises(NotFound):
            await w.service.update(s, w.tenant, cache.id, CachePatch(storage_class="cold"))
    assert (await w.row(cache.id)).status == "deleted"
    kinds = await _events(w, cache.id)
    assert "class_changed" not in kinds


async def test_sweep_leaves_a_cache_given_a_new_lifetime_meanwhile(world: World) -> None:
    """Two caches past their expiry; while the sweep releases the first, the second is given a
    new lifetime: the sweep expires the first only."""
    w = world
    first = await w.seed({1: "ready"})
    second = await w.seed({1: "ready"})
    past = utcnow() - timedelta(seconds=1)
    async with w.db.session() as s:
        await s.execute(
            update(Cache).where(Cache.id.in_([first.id, second.id])).values(expires_at=past)
        )
        await s.commit()

    async def patch_second() -> None:
        async with w.db.session() as s:
            await s.execute(
                update(Cache)
                .where(Cache.id == second.id)
                .values(expires_at=utcnow() + timedelta(hours=1))
            )
            await s.commit()

    Hook(w.store, "list_versions", patch_second)
    async with w.db.session() as s:
        expired = await w.service.sweep(s)
    statuses = {(await w.row(c)).status for c in (first.id,)}
    assert statuses == {"expired"}
    assert (await w.row(second.id)).status == "ready"
    assert expired == 1
    assert await w.stored_versions(second.id) == [1]


async def test_sweep_fails_a_pending_version_whose_lease_ran_out(world: World) -> None:
    """A create whose gateway died: its lease runs out and the next sweep fails it (not an
    hour later) and releases its manifest; a version still within its lease is left."""
    w = world
    dead = await w.seed({1: "pending"}, status="pending")
    alive = await w.seed({1: "pending"}, status="pending")
    async with w.db.session() as s:
        await s.execute(
            update(CacheVersion)
            .where(CacheVersion.cache_id == dead.id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
        await s.commit()
    async with w.db.session() as s:
        await w.service.sweep(s)
    assert (await w.row(dead.id)).status == "failed"
    assert await w.stored_versions(dead.id) == []
    assert (await w.row(alive.id)).status == "pending"
    assert await w.stored_versions(alive.id) == [1]


async def test_a_patch_does_not_write_a_cache_deleted_meanwhile(world: World) -> None:
    """The delete commits between the PATCH's lookup and its write: 404, and the deleted cache
    keeps its fields (no new lifetime for a deleted cache)."""
    w = world
    cache = await w.seed({1: "ready"})
    async with w.db.session() as s:
        row = await w.service.get_live(s, w.tenant, cache.id)
        await _delete(w, cache.id)  # the competing transaction, between the two steps
        with pytest.raises(NotFound):
            await w.service._set_fields(s, row, {"name": "renamed", "ttl_seconds": 7200})
    after = await w.row(cache.id)
    assert (after.status, after.name, after.ttl_seconds) == ("deleted", None, 3600)
