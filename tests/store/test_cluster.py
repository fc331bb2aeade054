"""A tiered store against a real Redis Cluster (three primaries started by the session
fixture): chunks and manifests of several tenants (several slots) round-trip, the reference
scripts run on one slot each, GC and idle demotion work across the primaries."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvaas.store import RedisConnection, TieredStore
from kvaas.store.redis_tier import RedisTier


async def test_store_on_a_cluster(
    cluster_conn: RedisConnection,
    make_store: Callable[..., TieredStore],
    new_tenant: Callable[[], Any],
) -> None:
    store = make_store(conn=cluster_conn)
    await store.open()
    tenants = [new_tenant() for _ in range(4)]  # their slots map to different slots
    per: list[tuple[Any, list[Any]]] = []
    for i, t in enumerate(tenants):
        chunks = t.chunks(5, size=4000)
        keys = [k for k, _ in chunks]
        await store.put_manifest(t.manifest(keys[:3], f"c{i}", 1))
        await store.put_manifest(t.manifest(keys, f"c{i}", 2))
        await store.put_chunks(chunks, "standard")
        per.append((t, chunks))
    assert len({store.tier("redis").keys.chunk(c[0][0]).split("}")[0] for _, c in per}) == 4
    for i, (t, chunks) in enumerate(per):
        keys = [k for k, _ in chunks]
        assert await store.get_prefix(keys) == [b for _, b in chunks]
        assert await store.list_versions(t.slot, f"c{i}") == [1, 2]
        assert (await store.get_manifest(t.slot, f"c{i}", 2)).chunk_keys == tuple(keys)  # type: ignore[union-attr]
        assert [c.total for c in await store.refs.ref_counts(keys)] == [2, 2, 2, 1, 1]
    assert (await store.usage())["redis"] == 4 * 5 * 4000
    health = await store.health()
    assert health["redis"].status == "ok" and "cluster" in health["redis"].detail

    # release everything of tenants 0 and 1 and collect: candidates in two slots
    for i in (0, 1):
        t = per[i][0]
        for v in (1, 2):
            await store.delete_manifest(t.slot, f"c{i}", v)
    result = await store.collect_garbage()
    assert result.claimed == 10 and result.deleted_per_tier["redis"] == 10
    for i, (_, chunks) in enumerate(per):
        expect = [] if i < 2 else [b for _, b in chunks]
        assert await store.get_prefix([k for k, _ in chunks]) == expect

    # idle demotion scans every primary
    redis = store.tier("redis")
    assert isinstance(redis, RedisTier)
    assert await store.demote_idle(0) == 10
    keys = [k for _, chunks in per[2:] for k, _ in chunks]
    assert await redis.exists_many(keys) == [False] * 10
    assert await store.tier("disk").exists_many(keys) == [True] * 10
    assert await store.set_storage_class(per[2][0].slot, "c2", 2, "hot")
    assert await redis.exists_many(keys[:5]) == [True] * 5
