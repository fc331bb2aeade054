"""Garbage collection while writers run: no chunk of a live manifest is ever deleted.

Two stores share the backing tiers and the index (like two processes): writer tasks on one
store keep storing, extending and releasing versions whose chunks overlap heavily, collector
tasks on the other collect with no grace period. Every writer checks its version right after
writing it, and at the end a third store without a memory tier (so nothing is served from a
process-local cache) reads every live version back in full.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from kvaas.store import Manifest, RedisConnection, TieredStore

WRITERS = 4
COLLECTORS = 2
ROUNDS = 80


@pytest.fixture(params=["sqlite", "redis", "cluster"])
async def backing(
    request: pytest.FixtureRequest, redis_cleanup: Callable[..., Any]
) -> AsyncIterator[dict[str, Any]]:
    """The index kind (and, for the Redis Cluster, the connection) the stores share."""
    if request.param != "cluster":
        yield {"index": request.param}
        return
    url = request.getfixturevalue("redis_cluster")
    prefix = f"kvt-{secrets.token_hex(4)}"
    yield {"index": "redis", "conn": RedisConnection(url, cluster=True, prefix=prefix)}
    await redis_cleanup(url, prefix, cluster=True)


async def test_gc_never_deletes_chunks_of_live_manifests(
    backing: dict[str, Any],
    make_store: Callable[..., TieredStore],
    tmp_path: Path,
    tenant: Any,
    blob: Callable[..., bytes],
) -> None:
    shared = tmp_path / "shared"
    common: dict[str, Any] = {"disk_dir": shared, "index_path": shared / "i.db", **backing}
    writer_store = make_store(memory=16_000, **common)  # small: evictions and demotions too
    collector_store = make_store(memory=48_000, **common)
    checker = make_store(memory=None, **common)
    for s in (writer_store, collector_store, checker):
        await s.open()

    chains = [tenant.keys(8, start=s) for s in range(2)]  # versions are prefixes of chains
    blobs = {k: blob(2000) for chain in chains for k in chain}
    live: dict[tuple[str, int], Manifest] = {}
    stop = asyncio.Event()
    stats = {"claimed": 0, "passes": 0, "checked": 0}
    classes = ["standard", "cold", "hot"]

    async def writer(w: int) -> None:
        rng = random.Random(w)
        mine: list[Manifest] = []
        # at least ROUNDS versions, and on until the collectors have claimed something while
        # the writes go on (a busy machine may not run them early): a hang guard caps it
        version = 0
        while version < ROUNDS or (stats["claimed"] == 0 and version < 50 * ROUNDS):
            version += 1
            chain = chains[rng.randrange(len(chains))]
            keys = chain[: rng.randrange(1, len(chain) + 1)]
            m = tenant.manifest(
                keys, f"w{w}", version, storage_class=classes[rng.randrange(len(classes))]
            )
            await writer_store.put_manifest(m)  # references first
            await writer_store.put_chunks([(k, blobs[k]) for k in keys], m.storage_class)
            live[(m.cache_id, m.version)] = m
            mine.append(m)
            got = await checker.get_prefix(keys)  # no memory tier: what the shared tiers hold
            assert len(got) == len(keys), f"writer {w} v{version}: lost a chunk right away"
            stats["checked"] += 1
            if len(mine) > 1:  # release the previous version: tail chunks flip in and out
                old = mine.pop(0)
                del live[(old.cache_id, old.version)]
                assert await writer_store.delete_manifest(tenant.slot, old.cache_id, old.version)
            await asyncio.sleep(0)

    async def collector(c: int) -> None:
        rng = random.Random(100 + c)
        while not stop.is_set():
            result = await collector_store.collect_garbage(grace_s=0, limit=rng.randrange(1, 20))
            stats["claimed"] += result.claimed
            stats["passes"] += 1
            await asyncio.sleep(rng.random() * 0.002)

    collectors = [asyncio.create_task(collector(c)) for c in range(COLLECTORS)]
    try:
        await asyncio.wait_for(asyncio.gather(*(writer(w) for w in range(WRITERS))), 60)
    finally:
        stop.set()
        await asyncio.gather(*collectors)

    assert stats["claimed"] > 0 and stats["passes"] > 10  # the collectors really collected
    assert stats["checked"] >= WRITERS * ROUNDS
    for (cache_id, version), m in live.items():
        assert await checker.get_manifest(tenant.slot, cache_id, version) == m
        got = await checker.get_prefix(list(m.chunk_keys))
        assert got == [blobs[k] for k in m.chunk_keys], f"{cache_id} v{version} lost chunks"
    # and once everything is released, everything is collected
    for cache_id, version in list(live):
        await writer_store.delete_manifest(tenant.slot, cache_id, version)
    while (await collector_store.collect_garbage(limit=10_000)).claimed:
        pass
    all_keys = [k for chain in chains for k in chain]
    assert await checker.exists_many(all_keys) == [False] * len(all_keys)
