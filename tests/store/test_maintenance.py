"""The store's maintenance loops run on their own: GC (several batches a round, independent of
any other job), idle demotion of ``standard`` chunks to disk, and a failing job never stops
the others."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from kvaas.store import MaintenanceConfig, StoreMaintenance, TieredStore


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 30.0) -> None:
    """Wait until ``check()`` holds (polling; the bound only keeps a broken build from hanging)."""
    async with asyncio.timeout(timeout_s):
        while not await check():  # noqa: ASYNC110 - the store has no event to wait on
            await asyncio.sleep(0.02)


async def _release(store: TieredStore, tenant: Any, n: int, cache_id: str = "c") -> list[Any]:
    chunks = tenant.chunks(n, size=256)
    keys = [k for k, _ in chunks]
    m = tenant.manifest(keys, cache_id=cache_id)
    await store.put_manifest(m)
    await store.put_chunks(chunks, "standard")
    await store.delete_manifest(m.namespace_slot, m.cache_id, m.version)
    return keys


async def test_idle_standard_chunks_are_demoted_to_disk_by_the_schedule(
    make_store: Callable[..., TieredStore], tenant: Any
) -> None:
    store = make_store(memory=None)
    await store.open()
    std, hot = tenant.chunks(2), tenant.chunks(2, start=10)
    await store.put_manifest(tenant.manifest([k for k, _ in std], "s", storage_class="standard"))
    await store.put_manifest(tenant.manifest([k for k, _ in hot], "h", storage_class="hot"))
    await store.put_chunks(std, "standard")
    await store.put_chunks(hot, "hot")
    cfg = MaintenanceConfig(demote_every_s=0.05, demote_idle_s=0, gc_every_s=3600)
    maintenance = StoreMaintenance(store, cfg)
    maintenance.start()
    redis, disk = store.tier("redis"), store.tier("disk")
    try:
        std_keys = [k for k, _ in std]

        async def demoted() -> bool:
            return await disk.exists_many(std_keys) == [True, True]

        await eventually(demoted)
        assert await redis.exists_many(std_keys) == [False, False]
        assert await redis.exists_many([k for k, _ in hot]) == [True, True]  # hot stays
        assert await store.get_prefix(std_keys) == [b for _, b in std]
    finally:
        await maintenance.stop()


async def test_gc_runs_on_its_own_and_a_failing_job_does_not_stop_it(
    make_store: Callable[..., TieredStore], tenant: Any
) -> None:
    """A job that always fails (as the expiry sweep may) runs beside GC: GC still collects."""
    store = make_store(memory=None)
    await store.open()
    failures = 0

    async def broken() -> None:
        nonlocal failures
        failures += 1
        raise RuntimeError("the sweep's database is down")

    cfg = MaintenanceConfig(
        gc_every_s=0.05, gc_grace_s=0, demote_idle_s=None, jobs=(("sweep", 0.01, broken),)
    )
    maintenance = StoreMaintenance(store, cfg)
    maintenance.start()
    try:
        keys = await _release(store, tenant, 5)

        async def collected() -> bool:
            return await store.exists_many(keys) == [False] * 5 and failures > 2

        await eventually(collected)
    finally:
        await maintenance.stop()


async def test_a_gc_round_drains_more_than_one_batch(
    make_store: Callable[..., TieredStore], tenant: Any
) -> None:
    store = make_store(memory=None)
    await store.open()
    keys = await _release(store, tenant, 23)
    maintenance = StoreMaintenance(store, MaintenanceConfig(gc_batch=5, gc_grace_s=0))
    assert await maintenance.gc_round() == 23
    assert await store.exists_many(keys) == [False] * 23
