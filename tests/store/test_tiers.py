"""The tier contract, run against every tier (memory, disk, Redis, Redis Cluster), plus the
tier-specific behaviour: budgets, TTL, atomic disk writes and a real full filesystem."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from kvtest.services import REDIS_URL

from kvaas.store import (
    BlobTooLarge,
    ConfigurationError,
    DiskTier,
    MemoryTier,
    RedisConnection,
    RedisTier,
    StorageFull,
    Tier,
)
from kvaas.store.disk import STALE_TEMP_SECONDS

TIERS = ["memory", "disk", "redis", "cluster"]


@pytest.fixture(params=TIERS)
async def tier(
    request: pytest.FixtureRequest, tmp_path: Path, redis_cleanup: Callable[..., object]
) -> AsyncIterator[Tier]:
    kind = request.param
    t: Tier
    prefix = f"kvt-{secrets.token_hex(4)}"
    url = None
    if kind == "memory":
        t = MemoryTier(1 << 20)
    elif kind == "disk":
        t = DiskTier(tmp_path / "disk", 1 << 20)
    else:
        url = REDIS_URL if kind == "redis" else request.getfixturevalue("redis_cluster")
        t = RedisTier(RedisConnection(url, cluster=kind == "cluster", prefix=prefix))
    await t.open()
    try:
        yield t
    finally:
        await t.close()
        if url is not None:
            await redis_cleanup(url, prefix, cluster=kind == "cluster")  # type: ignore[misc]


async def test_round_trip(tier: Tier, tenant: object, blob: Callable[..., bytes]) -> None:
    keys = tenant.keys(4)  # type: ignore[attr-defined]
    blobs = [blob(1000 + i) for i in range(3)]
    base = await tier.bytes_used()
    assert await tier.put_many(list(zip(keys, blobs, strict=False))) == sum(map(len, blobs))
    assert await tier.bytes_used() == base + sum(map(len, blobs))
    got = await tier.get_many([keys[3], keys[0], keys[2], keys[1]])
    assert [None if g is None else bytes(g) for g in got] == [None, blobs[0], blobs[2], blobs[1]]
    assert await tier.exists_many(keys) == [True, True, True, False]
    assert await tier.sizes_many(keys) == [1000, 1001, 1002, None]
    assert await tier.get(keys[0]) == blobs[0] and await tier.exists(keys[3]) is False
    # content addressed: a second put of present keys stores nothing and counts 0
    assert await tier.put_many([(keys[0], blobs[0]), (keys[1], blobs[1])]) == 0
    assert await tier.put(keys[3], blobs[0]) == len(blobs[0])
    assert await tier.delete_many([keys[0], keys[3], keys[3]]) == 2
    assert await tier.delete(keys[0]) is False
    assert await tier.exists_many(keys) == [False, True, True, False]
    assert await tier.bytes_used() == base + len(blobs[1]) + len(blobs[2])
    assert (await tier.health()).status == "ok"


async def test_batches_and_duplicates(
    tier: Tier, tenant: object, blob: Callable[..., bytes]
) -> None:
    assert await tier.get_many([]) == [] and await tier.put_many([]) == 0
    assert await tier.exists_many([]) == [] and await tier.delete_many([]) == 0
    keys = tenant.keys(50)  # type: ignore[attr-defined]
    b = blob(512)
    # a key given twice in one batch is stored and counted once
    assert await tier.put_many([(keys[0], b), (keys[0], b)]) == len(b)
    items = [(k, blob(512)) for k in keys]
    assert await tier.put_many(items) == 49 * 512
    got = await tier.get_many(keys)
    assert [bytes(g) for g in got if g is not None] == [b] + [x for _, x in items[1:]]


async def test_concurrent_puts_of_one_key(
    tier: Tier, tenant: object, blob: Callable[..., bytes]
) -> None:
    key = tenant.keys(1)[0]  # type: ignore[attr-defined]
    b = blob(4096)
    await asyncio.gather(*(tier.put(key, b) for _ in range(8)))
    assert bytes(await tier.get(key) or b"") == b


# -- budgets -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["memory", "disk"])
async def test_budget_is_a_hard_limit(
    kind: str, tmp_path: Path, tenant: object, blob: Callable[..., bytes]
) -> None:
    t: Tier = MemoryTier(10_000) if kind == "memory" else DiskTier(tmp_path, 10_000)
    keys = tenant.keys(4)  # type: ignore[attr-defined]
    with pytest.raises(BlobTooLarge):
        await t.put(keys[0], blob(10_001))
    await t.put_many([(keys[0], blob(4000)), (keys[1], blob(4000))])
    with pytest.raises(StorageFull) as e:
        await t.put_many([(keys[2], blob(1000)), (keys[3], blob(1500))])
    assert e.value.tier == kind and e.value.status_code == 507
    assert await t.exists_many(keys) == [True, True, False, False]  # nothing partial
    assert await t.bytes_used() == 8000
    with pytest.raises(ConfigurationError):
        MemoryTier(0)


# -- Redis ---------------------------------------------------------------------------------------
async def test_redis_ttl_expires_idle_chunks_and_reads_refresh(
    make_conn: Callable[..., RedisConnection], tenant: object, blob: Callable[..., bytes]
) -> None:
    t = RedisTier(make_conn(), ttl_s=1.0)
    try:
        a, b = tenant.keys(2)  # type: ignore[attr-defined]
        await t.put_many([(a, blob(100)), (b, blob(100))])
        for _ in range(4):  # keep reading a: its expiry is pushed back each time
            await asyncio.sleep(0.3)
            assert await t.get(a) is not None
        assert await t.exists_many([a, b]) == [True, False]
        assert await t.recount() == 100
        assert await t.bytes_used() == 100
    finally:
        await t.close()


# -- disk ----------------------------------------------------------------------------------------
async def test_disk_writes_are_atomic_and_reopen_rebuilds(
    tmp_path: Path, tenant: object, blob: Callable[..., bytes]
) -> None:
    root = tmp_path / "d"
    t = DiskTier(root, 1 << 20)
    keys = tenant.keys(3)  # type: ignore[attr-defined]
    items = [(k, blob(3000)) for k in keys]
    await t.put_many(items)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    assert len(files) == 3 and not [p for p in files if p.name.endswith(".tmp")]
    assert t.path_of(keys[0]).read_bytes() == items[0][1]
    # a crashed writer's leftover temp file is removed on open; fresh ones are left alone
    stale = t.path_of(keys[0]).parent / ".x.abc.tmp"
    stale.write_bytes(b"partial")
    old = time.time() - STALE_TEMP_SECONDS - 10
    os.utime(stale, (old, old))
    t2 = DiskTier(root, 1 << 20)
    found = await t2.open()
    assert {k for k, _ in found} == set(keys) and await t2.bytes_used() == 9000
    assert not stale.exists()
    # another process (instance) deletes a chunk: a put writes it again although the first
    # instance's index still lists it
    await t2.delete_many([keys[1]])
    assert await t.put_many([items[1]]) == 3000
    assert t.path_of(keys[1]).read_bytes() == items[1][1]
    # and a file written by the other instance is adopted on first sight
    extra = tenant.keys(4)[3]  # type: ignore[attr-defined]
    await t2.put(extra, blob(100))
    assert await t.sizes_many([extra]) == [100]


async def test_disk_full_filesystem_leaves_no_partial_file(
    small_fs: Path, tenant: object, blob: Callable[..., bytes]
) -> None:
    """A real ENOSPC (a 1 MiB tmpfs under a far larger budget) fails the write cleanly."""
    await _full_write_leaves_no_partial_file(DiskTier(small_fs, 64 << 20), tenant, blob)


async def test_disk_budget_full_leaves_no_partial_file(
    tmp_path: Path, tenant: object, blob: Callable[..., bytes]
) -> None:
    """The byte budget running out fails the write the same way as a full filesystem."""
    await _full_write_leaves_no_partial_file(DiskTier(tmp_path / "d", 1 << 20), tenant, blob)


async def _full_write_leaves_no_partial_file(
    t: DiskTier, tenant: object, blob: Callable[..., bytes]
) -> None:
    """Three 400 kB chunks into 1 MiB: the write fails with StorageFull; the chunks written
    before it stay whole, the failing one leaves neither a final nor a temporary file."""
    keys = tenant.keys(3)  # type: ignore[attr-defined]
    items = [(k, blob(400_000)) for k in keys]
    with pytest.raises(StorageFull):
        await t.put_many(items)
    files = [p for p in t.root.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".tmp")]
    for k, b in items:
        p = t.path_of(k)
        assert not p.exists() or p.read_bytes() == b  # whole or absent, never partial
    present = await t.exists_many(keys)
    assert present[-1] is False
    got = await t.get_many(keys)
    assert all(g is None or bytes(g) == b for g, (_, b) in zip(got, items, strict=True))
    assert (await t.health()).status == "ok"
