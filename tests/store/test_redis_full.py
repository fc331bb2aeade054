"""Redis at ``maxmemory`` (``noeviction``, the policy the index requires): chunk writes are
refused (``standard`` spills to disk), but manifests, releases and garbage collection still
work, so a full Redis is drained instead of stranding references."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from kvaas.store import RedisConnection, TieredStore
from kvaas.store.errors import StorageFull


async def test_full_redis_keeps_the_index_working_and_gc_drains_it(
    private_redis: Callable[..., Any],
    make_conn: Callable[..., RedisConnection],
    make_store: Callable[..., TieredStore],
    tenant: Any,
) -> None:
    server = private_redis("--maxmemory", "3mb", "--maxmemory-policy", "noeviction")
    store = make_store(memory=None, conn=make_conn(server.url))
    await store.open()
    filled = []
    with pytest.raises(StorageFull):
        for i in range(40):
            chunk = tenant.chunks(1, size=1 << 17, start=i)
            m = tenant.manifest([chunk[0][0]], cache_id=f"hot{i}", storage_class="hot")
            await store.put_manifest(m)
            filled.append(m)
            await store.put_chunks(chunk, "hot")
    # a standard create at maxmemory: its manifest commits, its chunks spill to disk
    spill = tenant.chunks(2, size=1 << 17, start=100)
    keys = [k for k, _ in spill]
    m = tenant.manifest(keys, cache_id="std")
    await store.put_manifest(m)
    await store.put_chunks(spill, "standard")
    assert await store.tier("disk").exists_many(keys) == [True, True]
    assert await store.get_prefix(keys) == [b for _, b in spill]
    # releases commit at maxmemory, and GC frees Redis
    for f in filled:
        assert await store.delete_manifest(f.namespace_slot, f.cache_id, f.version) is not None
    for _ in range(5):
        if not (await store.collect_garbage()).claimed:
            break
    hot_keys = [k for f in filled for k in f.chunk_keys]
    assert await store.tier("redis").exists_many(hot_keys) == [False] * len(hot_keys)
    again = tenant.chunks(1, size=1 << 17, start=500)
    await store.put_manifest(tenant.manifest([again[0][0]], cache_id="later", storage_class="hot"))
    assert await store.put_chunks(again, "hot") == 1 << 17  # room again
