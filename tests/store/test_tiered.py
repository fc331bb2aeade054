"""TieredStore on real tiers: batched reads, promotion, eviction with demotion, integrity,
manifests with shared chunks, garbage collection, class changes and idle demotion."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from kvtest.damage import flip_redis_bytes
from prometheus_client import REGISTRY

from kvaas.store import (
    BlobTooLarge,
    ManifestConflict,
    ManifestNotFound,
    Placement,
    RedisTier,
    StorageFull,
    StoreError,
    TieredStore,
)
from kvaas.store.disk import DiskTier
from kvaas.store.policy import DEFAULT_PLACEMENT


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def calls(tier: str, op: str) -> float:
    return sample("kvaas_store_op_seconds_count", tier=tier, op=op)


async def where(store: TieredStore, keys: list[Any]) -> dict[str, list[bool]]:
    return {t.name: await t.exists_many(keys) for t in store.tiers}


# -- reads and promotion -------------------------------------------------------------------------
async def test_prefix_fetch_is_batched_and_promotes(
    make_store: Callable[..., TieredStore], tenant: Any
) -> None:
    store = make_store()
    await store.open()
    chunks = tenant.chunks(6)
    keys = [k for k, _ in chunks]
    m = tenant.manifest(keys, storage_class="cold")
    await store.put_manifest(m)
    assert await store.put_chunks(chunks, "cold") == sum(len(b) for _, b in chunks)
    assert await where(store, keys) == {
        "memory": [False] * 6,
        "redis": [False] * 6,
        "disk": [True] * 6,
    }
    before = {t: calls(t, "get") for t in ("memory", "redis", "disk")}
    promoted = sample("kvaas_store_promotions_total", tier="memory")
    blobs = await store.get_prefix(keys)
    assert blobs == [b for _, b in chunks]
    # one batched get per tier, however many chunks
    assert {t: calls(t, "get") - before[t] for t in before} == {"memory": 1, "redis": 1, "disk": 1}
    # a cold chunk is promoted to the memory cache only (Redis is not in its placement)
    assert await where(store, keys) == {
        "memory": [True] * 6,
        "redis": [False] * 6,
        "disk": [True] * 6,
    }
    assert sample("kvaas_store_promotions_total", tier="memory") - promoted == 6
    # now served from memory alone: lower tiers are not asked
    before = {t: calls(t, "get") for t in ("memory", "redis", "disk")}
    assert await store.get_prefix(keys) == blobs
    assert {t: calls(t, "get") - before[t] for t in before} == {"memory": 1, "redis": 0, "disk": 0}
    assert await store.longest_prefix(keys) == 6
    assert await store.exists_many(keys) == [True] * 6


async def test_standard_chunk_found_on_disk_goes_back_to_redis(
    make_store: Callable[..., TieredStore], tenant: Any
) -> None:
    store = make_store(memory=None)
    await store.open()
    chunks = tenant.chunks(3)
    keys = [k for k, _ in chunks]
    await store.put_manifest(tenant.manifest(keys, storage_class="standard"))
    await store.put_chunks(chunks, "standard")
    assert await where(store, keys) == {"redis": [True] * 3, "disk": [False] * 3}
    assert await store.demote_idle(0) == 3  # idle standard chunks: Redis → disk
    assert await where(store, keys) == {"redis": [False] * 3, "disk": [True] * 3}
    assert await store.get_prefix(keys) == [b for _, b in chunks]
    assert await where(store, keys) == {"redis": [True] * 3, "disk": [True] * 3}


async def test_missing_middle_chunk_ends_the_prefix(
    make_store: Callable[..., TieredStore], tenant: Any
) -> None:
    store = make_store(redis=False)
    await store.open()
    chunks = tenant.chunks(5)
    keys = [k for k, _ in chunks]
    await store.put_chunks(chunks, "cold")
    await store.tier("disk").delete_many([keys[2]])
    assert await store.get_prefix(keys) == [chunks[0][1], chunks[1][1]]
    assert await store.longest_prefix(keys) == 2
    assert await store.exists_many(keys) == [True, True, False, True, True]
    assert await store.get_prefix([]) == [] and await store.longest_prefix([]) == 0


# -- integrity -----------------------------------------------------------------------------------
async def test_corrupt_disk_blob_is_a_miss_counted_and_removed(
    make_store: Callable[..., TieredStore], tenant: Any
) -> None:
    store = make_store(redis=False)
    await store.open()
    chunks = tenant.chunks(4)
    keys = [k for k, _ in chunks]
    await store.put_chunks(chunks, "cold")
    disk = store.tier("disk")
    assert isinstance(disk, DiskTier)
    path = disk.path_of(keys[1])
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit in the payload
    path.write_bytes(bytes(raw))
    corrupt = sample("kvaas_store_corrupt_reads_total", tier="disk")
    assert await store.get_prefix(keys) == [chunks[0][1]]  # never wrong bytes
    assert sample("kvaas_store_corrupt_reads_total", tier="disk") - corrupt == 1
    assert not path.exists()
    assert await store.get_prefix(keys) == [chunks[0][1]]
    # rewriting the chunk heals the prefix
    await store.put_chunks([chunks[1]], "cold")
    assert await store.get_prefix(keys) == [b for _, b in chunks]


async def test_corrupt_redis_blob_falls_back_to_a_good_copy_below(
    make_store: Callable[..., TieredStore], tenant: Any
) -> None:
    store = make_store(memory=None)
    await store.open()
    chunks = tenant.chunks(3)
    keys = [k for k, _ in chunks]
    await store.put_manifest(tenant.manifest(keys, storage_class="standard"))
    await store.put_chunks(chunks, "standard")
    redis = store.tier("redis")
    assert isinstance(redis, RedisTier)
    await flip_redis_bytes(redis, keys[2], 40, 2)
    corrupt = sample("kvaas_store_corrupt_reads_total", tier="redis")
    assert await store.get_prefix(keys) == [chunks[0][1], chunks[1][1]]  # only copy is bad
    assert sample("kvaas_store_corrupt_reads_total", tier="redis") - corrupt == 1
    assert await redis.exists_many(keys) == [True, True, False]
    # with a good copy on disk, a corrupt Redis copy is replaced by it
    await store.tier("disk").put_many(chunks)
    await flip_redis_bytes(redis, keys[0], 40, 2)
    assert await store.get_prefix(keys) == [b for _, b in chunks]
    assert await redis.get_many(keys) == [b for _, b in chunks]


# -- eviction ------------------------------------------------------------------------------------
MEMORY_FIRST = {
    **DEFAULT_PLACEMENT,
    "hot": Placement(tiers=("memory",), fallback=("memory",)),
}


async def test_eviction_demotes_referenced_chunks_and_drops_the_rest(
    make_store: Callable[..., TieredStore], tenant: Any, new_tenant: Callable[[], Any]
) -> None:
    store = make_store(memory=10_000, redis=False, placement=MEMORY_FIRST)
    await store.open()
    unref = tenant.chunks(1, size=2000, start=99)
    live = tenant.chunks(4, size=2000)
    await store.put_chunks(unref, "hot")  # oldest, referenced by nothing
    await store.put_manifest(tenant.manifest([k for k, _ in live], storage_class="hot"))
    await store.put_chunks(live, "hot")
    assert await store.usage() == {"memory": 10_000, "disk": 0}
    evicted = sample("kvaas_store_evictions_total", tier="memory")
    demoted = sample("kvaas_store_demotions_total", tier="memory")
    other = new_tenant().chunks(1, size=2000)
    await store.put_chunks(other, "hot")  # evicts the unreferenced chunk: dropped
    assert await store.exists_many([unref[0][0]]) == [False]
    more = new_tenant().chunks(1, size=4000)
    await store.put_chunks(more, "hot")  # evicts two referenced chunks: demoted to disk
    keys = [k for k, _ in live]
    assert await where(store, keys) == {
        "memory": [False, False, True, True],
        "disk": [True, True, False, False],
    }
    assert sample("kvaas_store_evictions_total", tier="memory") - evicted == 3
    assert sample("kvaas_store_demotions_total", tier="memory") - demoted == 2
    assert await store.get_prefix(keys) == [b for _, b in live]  # nothing of the cache lost


async def test_size_aware_policy_in_the_store(
    make_store: Callable[..., TieredStore], tenant: Any
) -> None:
    from kvaas.store import SizeAwarePolicy

    store = make_store(memory=10_000, redis=False, placement=MEMORY_FIRST, policy=SizeAwarePolicy())
    await store.open()
    small = tenant.chunks(3, size=1000)
    big = tenant.chunks(1, size=6000, start=50)
    await store.put_chunks(small, "hot")
    await store.put_chunks(big, "hot")
    await store.put_chunks(tenant.chunks(1, size=2000, start=70), "hot")
    # the large chunk goes first even though the small ones are older
    assert await store.tier("memory").exists_many([big[0][0]]) == [False]
    assert await store.tier("memory").exists_many([k for k, _ in small]) == [True] * 3


async def test_bottom_tier_never_drops_referenced_chunks(
    make_store: Callable[..., TieredStore], tenant: Any
) -> None:
    store = make_store(memory=None, redis=False, disk=10_000)
    await store.open()
    live = tenant.chunks(4, size=2000)
    junk = tenant.chunks(1, size=2000, start=99)
    m = tenant.manifest([k for k, _ in live], storage_class="cold")
    await store.put_manifest(m)
    await store.put_chunks(live, "cold")
    await store.put_chunks(junk, "cold")
    extra = tenant.chunks(1, size=2000, start=200)
    await store.put_manifest(tenant.manifest([extra[0][0]], "c2", storage_class="cold"))
    await store.put_chunks(extra, "cold")  # room made by dropping the unreferenced chunk
    assert await store.exists_many([junk[0][0], extra[0][0]]) == [False, True]
    with pytest.raises(StorageFull):
        await store.put_chunks(tenant.chunks(1, size=2000, start=300), "cold")
    assert await store.get_prefix([k for k, _ in live]) == [b for _, b in live]
    with pytest.raises(BlobTooLarge):
        await store.put_chunks(tenant.chunks(1, size=10_001, start=400), "cold")
    # releasing the cache and collecting makes room again
    await store.delete_manifest(m.namespace_slot, m.cache_id, m.version)
    assert (await store.collect_garbage()).claimed == 4
    await store.put_chunks(tenant.chunks(1, size=2000, start=300), "cold")
    assert await store.usage() == {"disk": 4000}


async def test_store_wide_chunk_limit(make_store: Callable[..., TieredStore], tenant: Any) -> None:
    store = make_store(redis=False, max_chunk_bytes=4096)
    await store.open()
    with pytest.raises(BlobTooLarge) as e:
        await store.put_chunks(tenant.chunks(1, size=5000), "cold")
    assert e.value.status_code == 413


# -- manifests, references and GC ----------------------------------------------------------------
@pytest.mark.parametrize("index", ["sqlite", "redis"])
async def test_versions_share_chunks_and_gc_deletes_only_unreferenced(
    index: str, make_store: Callable[..., TieredStore], tenant: Any
) -> None:
    store = make_store(index=index)
    await store.open()
    chunks = tenant.chunks(5)
    keys = [k for k, _ in chunks]
    v1 = tenant.manifest(keys[:3], version=1)
    v2 = tenant.manifest(keys, version=2)  # extends v1: shares its three chunks
    for m in (v1, v2):
        await store.put_manifest(m)
        await store.put_chunks(chunks[: len(m.chunk_keys)], m.storage_class)
    await store.put_manifest(v1)  # idempotent: no second reference
    with pytest.raises(ManifestConflict):
        await store.put_manifest(tenant.manifest(keys[:2], version=1))
    assert await store.get_manifest(tenant.slot, "c1", 2) == v2
    assert await store.get_manifest(tenant.slot, "c1", 3) is None
    assert await store.list_versions(tenant.slot, "c1") == [1, 2]
    counts = await store.refs.ref_counts(keys)
    assert [c.total for c in counts] == [2, 2, 2, 1, 1]

    assert await store.delete_manifest(tenant.slot, "c1", 1) == v1
    assert await store.delete_manifest(tenant.slot, "c1", 1) is None  # releases once
    assert (await store.collect_garbage()).claimed == 0  # all still used by v2
    assert await store.get_prefix(keys) == [b for _, b in chunks]

    await store.delete_manifest(tenant.slot, "c1", 2)
    assert await store.list_versions(tenant.slot, "c1") == []
    assert (await store.collect_garbage(grace_s=60)).claimed == 0  # too recent
    deleted = sample("kvaas_store_gc_chunks_deleted_total")
    result = await store.collect_garbage(limit=3)
    assert result.claimed == 3 and not result.skipped_tiers and not result.lease_expired
    result = await store.collect_garbage()
    assert result.claimed == 2 and result.deleted_per_tier["redis"] == 2
    assert sample("kvaas_store_gc_chunks_deleted_total") - deleted == 5
    assert await store.exists_many(keys) == [False] * 5
    assert (await store.collect_garbage()).claimed == 0


@pytest.mark.parametrize("index", ["sqlite", "redis"])
async def test_put_manifest_waits_for_a_collector(
    index: str,
    make_store: Callable[..., TieredStore],
    tenant: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = make_store(index=index, tombstone_wait_s=0.3)
    await store.open()
    chunks = tenant.chunks(2)
    keys = [k for k, _ in chunks]
    m = tenant.manifest(keys)
    await store.put_manifest(m)
    await store.put_chunks(chunks, "standard")
    await store.delete_manifest(m.namespace_slot, m.cache_id, m.version)
    claim = await store.refs.claim_garbage(grace_s=0, limit=10, lease_s=30)
    assert set(claim.keys) == set(keys)
    # a writer re-referencing the chunks now must wait for the collector: past its bound
    # (tombstone_wait_s) it gives up with a StoreError
    with pytest.raises(StoreError, match="garbage-collected"):
        await store.put_manifest(m)
    # within its bound it waits: it polls the tombstones until the collector is done (the
    # bound is raised so that only a hang, never a slow machine, can run it out)
    store.tombstone_wait_s = 300
    polled = asyncio.Event()
    tombstoned = store.refs.tombstoned

    async def watched(keys: list[Any]) -> list[bool]:
        flags = await tombstoned(keys)
        if any(flags):
            polled.set()  # the writer saw a tombstone and keeps waiting
        return flags

    monkeypatch.setattr(store.refs, "tombstoned", watched)
    waiter = asyncio.create_task(store.put_manifest(m))
    await asyncio.wait_for(polled.wait(), 60)
    assert not waiter.done()
    for t in store.tiers:
        await t.delete_many(keys)
    await store.refs.finish_claim(claim)
    await asyncio.wait_for(waiter, 60)
    assert await store.exists_many(keys) == [False, False]  # the writer now writes them
    await store.put_chunks(chunks, "standard")
    assert await store.get_prefix(keys) == [b for _, b in chunks]
    assert (await store.collect_garbage()).claimed == 0


@pytest.mark.parametrize("index", ["sqlite", "redis"])
async def test_expired_lease_gives_the_claim_back(
    index: str, make_store: Callable[..., TieredStore], tenant: Any
) -> None:
    store = make_store(index=index)
    await store.open()
    chunks = tenant.chunks(2)
    await store.put_chunks(chunks, "standard")
    m = tenant.manifest([k for k, _ in chunks])
    await store.put_manifest(m)
    await store.delete_manifest(m.namespace_slot, m.cache_id, m.version)
    result = await store.collect_garbage(lease_s=0.0)
    assert result.claimed == 2 and result.lease_expired and not result.deleted_per_tier
    assert await store.exists_many([k for k, _ in chunks]) == [True, True]
    result = await store.collect_garbage()  # the candidates came back
    assert result.claimed == 2 and await store.exists_many([k for k, _ in chunks]) == [False] * 2


# -- storage classes -----------------------------------------------------------------------------
async def test_set_storage_class_moves_chunks(
    make_store: Callable[..., TieredStore], tenant: Any
) -> None:
    store = make_store(memory=None)
    await store.open()
    chunks = tenant.chunks(3)
    keys = [k for k, _ in chunks]
    m = tenant.manifest(keys, storage_class="standard")
    await store.put_manifest(m)
    await store.put_chunks(chunks, "standard")
    cold = await store.set_storage_class(tenant.slot, "c1", 1, "cold")
    assert cold.storage_class == "cold" and (await store.get_manifest(tenant.slot, "c1", 1)) == cold
    assert await where(store, keys) == {"redis": [False] * 3, "disk": [True] * 3}
    assert [c.cold for c in await store.refs.ref_counts(keys)] == [1, 1, 1]
    await store.set_storage_class(tenant.slot, "c1", 1, "hot")
    assert await where(store, keys) == {"redis": [True] * 3, "disk": [False] * 3}
    # a chunk another version keeps cold stays on disk too
    await store.put_manifest(tenant.manifest(keys[:1], version=2, storage_class="cold"))
    await store.put_chunks(chunks[:1], "cold")
    await store.set_storage_class(tenant.slot, "c1", 1, "standard")
    assert await where(store, keys) == {"redis": [True] * 3, "disk": [True, False, False]}
    with pytest.raises(ManifestNotFound):
        await store.set_storage_class(tenant.slot, "c1", 9, "hot")


async def test_demote_idle_moves_only_standard_chunks(
    make_store: Callable[..., TieredStore], tenant: Any
) -> None:
    store = make_store(memory=None)
    await store.open()
    std, hot, loose = tenant.chunks(2), tenant.chunks(2, start=10), tenant.chunks(1, start=20)
    await store.put_manifest(tenant.manifest([k for k, _ in std], "s", storage_class="standard"))
    await store.put_manifest(tenant.manifest([k for k, _ in hot], "h", storage_class="hot"))
    await store.put_chunks(std, "standard")
    await store.put_chunks(hot, "hot")
    await store.put_chunks(loose, "standard")  # unreferenced: left to GC
    assert await store.demote_idle(3600) == 0  # nothing idle that long
    assert await store.demote_idle(0) == 2
    keys = [k for k, _ in std + hot + loose]
    assert await where(store, keys) == {
        "redis": [False, False, True, True, True],
        "disk": [True, True, False, False, False],
    }


# -- observability -------------------------------------------------------------------------------
async def test_usage_and_health(make_store: Callable[..., TieredStore], tenant: Any) -> None:
    store = make_store()
    await store.open()
    chunks = tenant.chunks(2, size=3000)
    await store.put_chunks(chunks, "standard")
    await store.put_chunks(tenant.chunks(1, size=1000, start=9), "cold")
    assert await store.usage() == {"memory": 0, "redis": 6000, "disk": 1000}
    health = await store.health()
    assert set(health) == {"memory", "redis", "disk", "index"}
    assert all(h.status == "ok" for h in health.values())
    assert sample("kvaas_store_bytes_used", tier="redis") == 6000
    assert sample("kvaas_store_tier_up", tier="redis") == 1
    hits = sample("kvaas_store_hits_total", tier="redis")
    misses = sample("kvaas_store_misses_total", tier="memory")
    await store.get_prefix([k for k, _ in chunks])
    assert sample("kvaas_store_hits_total", tier="redis") - hits == 2
    assert sample("kvaas_store_misses_total", tier="memory") - misses == 2


async def test_a_warm_write_also_keeps_the_chunks_in_the_memory_tier(
    make_store: Callable[..., TieredStore], tenant: Any
) -> None:
    """``standard`` writes to Redis only; ``warm`` (an engine worker's save) keeps a copy in
    the process's memory tier too, not counted as stored bytes; without it, none."""
    store = make_store(memory=1 << 20)
    await store.open()
    warm, cold = tenant.chunks(2, size=2048), tenant.chunks(2, size=2048, start=10)
    keys = [k for k, _ in warm + cold]
    await store.put_manifest(tenant.manifest(keys, storage_class="standard"))
    assert await store.put_chunks(warm, "standard", warm=True) == 2 * 2048
    assert await store.put_chunks(cold, "standard") == 2 * 2048
    memory = store.tier("memory")
    assert await memory.exists_many([k for k, _ in warm]) == [True, True]
    assert await memory.exists_many([k for k, _ in cold]) == [False, False]
