"""GC is fair across tenants; a Redis that could evict index keys is refused at start-up."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from kvaas.store import RedisRefIndex, StoreMaintenance, TieredStore
from kvaas.store.errors import ConfigurationError


async def _release(store: TieredStore, tenant: Any, n: int, cache_id: str) -> list[Any]:
    chunks = tenant.chunks(n, size=256)
    keys = [k for k, _ in chunks]
    m = tenant.manifest(keys, cache_id=cache_id)
    await store.put_manifest(m)
    await store.put_chunks(chunks, "standard")
    await store.delete_manifest(m.namespace_slot, m.cache_id, m.version)
    return keys


async def test_gc_does_not_starve_a_tenant_behind_a_large_backlog(
    make_store: Callable[..., TieredStore], new_tenant: Callable[[], Any]
) -> None:
    """Tenant A (first in slot order) has a backlog of 60 chunks, tenant B 3: a pass of 10
    collects B's chunks too, and passes alternate between tenants."""
    store = make_store(memory=None, index="redis")
    await store.open()
    a, b = sorted((new_tenant() for _ in range(2)), key=lambda t: t.slot)
    keys_a = await _release(store, a, 60, "big")
    keys_b = await _release(store, b, 3, "small")
    result = await store.collect_garbage(limit=10)
    assert result.claimed >= 3
    assert await store.exists_many(keys_b) == [False] * 3  # B was not made to wait
    left_a = sum(await store.exists_many(keys_a))
    assert left_a >= 60 - 7
    for _ in range(20):
        if not (await store.collect_garbage(limit=10)).claimed:
            break
    assert await store.exists_many(keys_a) == [False] * 60


@pytest.mark.parametrize("policy", ["allkeys-lru", "allkeys-random", "volatile-lru"])
async def test_redis_that_may_evict_index_keys_is_refused(
    policy: str, private_redis: Callable[..., Any], make_conn: Callable[..., Any], tmp_path: Any
) -> None:
    redis = private_redis("--maxmemory", "64mb", "--maxmemory-policy", policy)
    index = RedisRefIndex(make_conn(redis.url))
    try:
        with pytest.raises(ConfigurationError, match="maxmemory-policy") as e:
            await index.open()
        assert policy in str(e.value) and "noeviction" in str(e.value)
    finally:
        await index.close()


async def test_noeviction_redis_is_accepted(
    private_redis: Callable[..., Any], make_conn: Callable[..., Any]
) -> None:
    redis = private_redis("--maxmemory", "64mb", "--maxmemory-policy", "noeviction")
    index = RedisRefIndex(make_conn(redis.url))
    try:
        await index.open()
        assert index.policy_checked
    finally:
        await index.close()


async def test_housekeeping_catches_a_policy_changed_after_start_up(
    private_redis: Callable[..., Any], make_conn: Callable[..., Any], make_store: Any
) -> None:
    """Redis reconfigured (or restarted with another configuration) while the store runs: the
    next housekeeping round reports it."""
    redis = private_redis("--maxmemory", "64mb", "--maxmemory-policy", "noeviction")
    store = make_store(memory=None, conn=make_conn(redis.url))
    await store.open()
    maintenance = StoreMaintenance(store)
    await maintenance.housekeeping_round()
    await store.refs.conn.run(lambda c: c.config_set("maxmemory-policy", "allkeys-lru"))
    with pytest.raises(ConfigurationError, match="allkeys-lru"):
        await maintenance.housekeeping_round()
