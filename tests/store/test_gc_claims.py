"""Garbage-collection claims survive crashes, cancellation and retried scripts.

A collector that dies (or is cancelled) between claiming chunks and deleting them must leave
them to a later pass, never orphan them; a claim run twice with the same token (redis-py sends a
script again after a socket timeout) must claim the same chunks, not lose them. Both index
kinds, real tiers; the only stand-in is a disk tier whose deletes wait on an event, so the test
can cancel the collector exactly while it deletes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from kvaas.store import DiskTier, RedisRefIndex, SqliteRefIndex, TieredStore
from kvaas.store.keys import ChunkKey
from kvaas.store.refs import new_claim_token

INDEXES = ["sqlite", "redis"]


async def _garbage(store: TieredStore, tenant: Any, n: int = 3) -> list[ChunkKey]:
    """``n`` chunks written under a manifest that is then released: GC candidates."""
    chunks = tenant.chunks(n)
    keys = [k for k, _ in chunks]
    m = tenant.manifest(keys)
    await store.put_manifest(m)
    await store.put_chunks(chunks, "standard")
    await store.delete_manifest(m.namespace_slot, m.cache_id, m.version)
    return keys


@pytest.mark.parametrize("index", INDEXES)
async def test_collector_killed_after_claim_leaves_chunks_to_a_later_pass(
    index: str, make_store: Callable[..., TieredStore], tenant: Any
) -> None:
    """A collector that claims and then dies (no finish, no abandon): once its lease is over,
    a later pass collects every chunk it had claimed."""
    store = make_store(index=index)
    await store.open()
    keys = await _garbage(store, tenant)
    claim = await store.refs.claim_garbage(grace_s=0.0, limit=100, lease_s=0.3)
    assert set(claim.keys) == set(keys)
    # ... the collector process is gone here; while its lease lasts nobody else takes them
    assert (await store.collect_garbage()).claimed == 0
    await asyncio.sleep(0.4)  # the dead collector's lease runs out
    result = await store.collect_garbage()
    assert result.claimed == len(keys)
    assert await store.exists_many(keys) == [False] * len(keys)
    assert (await store.collect_garbage()).claimed == 0  # finished: no candidate left


class GatedDisk(DiskTier):
    """A real disk tier whose deletes wait until ``gate`` is set (``entered`` tells when)."""

    def __init__(self, root: Path, capacity: int) -> None:
        super().__init__(root, capacity, durable=False)
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def delete_many(self, keys: Sequence[ChunkKey]) -> int:
        self.entered.set()
        await self.gate.wait()
        return await super().delete_many(keys)


@pytest.mark.parametrize("index", INDEXES)
async def test_cancelled_collector_gives_its_claim_back(
    index: str,
    make_conn: Callable[..., Any],
    tmp_path: Path,
    tenant: Any,
) -> None:
    """Cancelled while deleting (shutdown cancels the maintenance task): the claim is given
    back at once, so the next pass collects the chunks without waiting for the lease."""
    disk = GatedDisk(tmp_path / "disk", 8 << 20)
    refs = RedisRefIndex(make_conn()) if index == "redis" else SqliteRefIndex(tmp_path / "i.db")
    store = TieredStore([disk], refs, encrypted=False)
    await store.open()
    try:
        disk.gate.set()
        keys = await _garbage(store, tenant)
        disk.gate.clear()
        task = asyncio.create_task(store.collect_garbage(lease_s=3600.0))
        await disk.entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        disk.gate.set()
        assert await store.refs.tombstoned(keys) == [False] * len(keys)
        result = await store.collect_garbage(lease_s=3600.0)
        assert result.claimed == len(keys)
        assert await store.exists_many(keys) == [False] * len(keys)
    finally:
        await store.close()


async def test_claim_script_run_twice_claims_the_same_chunks(
    make_store: Callable[..., TieredStore], tenant: Any
) -> None:
    """redis-py sends a script again when the first reply was lost (socket timeout): the
    second run of the claim, same token, must answer the same chunks."""
    store = make_store(index="redis")
    await store.open()
    keys = await _garbage(store, tenant)
    refs = store.refs
    assert isinstance(refs, RedisRefIndex)
    names, args = refs.claim_call(tenant.slot, keys, new_claim_token(), lease_s=60.0, grace_s=0)
    first = await refs._eval(refs._claim, names, args)
    again = await refs._eval(refs._claim, names, args)
    assert sorted(int(i) for i in first[1:]) == sorted(int(i) for i in again[1:])
    assert len(first) - 1 == len(keys)


@pytest.mark.parametrize("index", INDEXES)
async def test_claim_with_the_same_token_is_idempotent(
    index: str, make_store: Callable[..., TieredStore], tenant: Any
) -> None:
    """Through the index API: claiming twice with one token gives the same chunks; another
    token gets none while the first lease lasts; finishing removes them for good."""
    store = make_store(index=index)
    await store.open()
    keys = await _garbage(store, tenant)
    token = new_claim_token()
    a = await store.refs.claim_garbage(grace_s=0.0, limit=100, lease_s=60.0, token=token)
    b = await store.refs.claim_garbage(grace_s=0.0, limit=100, lease_s=60.0, token=token)
    assert set(a.keys) == set(b.keys) == set(keys)
    other = await store.refs.claim_garbage(grace_s=0.0, limit=100, lease_s=60.0)
    assert other.keys == ()
    for t in store.tiers:
        await t.delete_many(keys)
    await store.refs.finish_claim(a)
    assert (await store.refs.claim_garbage(grace_s=0.0, limit=100, lease_s=60.0)).keys == ()


@pytest.mark.parametrize("index", INDEXES)
async def test_chunk_referenced_during_the_claim_is_not_dropped_as_candidate(
    index: str, make_store: Callable[..., TieredStore], tenant: Any
) -> None:
    """A writer references a claimed chunk, then releases it again while the collector still
    deletes: the collector's finish must leave the new candidate (the writer's copy, written
    after the tombstone went away, is collected by a later pass instead of leaking)."""
    store = make_store(index=index)
    await store.open()
    keys = await _garbage(store, tenant, n=1)
    claim = await store.refs.claim_garbage(grace_s=0.0, limit=100, lease_s=60.0)
    assert claim.keys == tuple(keys)
    m = tenant.manifest(keys, cache_id="again")
    assert await store.refs.put_manifest(m) == keys  # tombstoned: the writer would wait
    await asyncio.sleep(0.01)  # the release below is later than the claim on the index clock
    await store.refs.delete_manifest(m.namespace_slot, m.cache_id, m.version)
    for t in store.tiers:
        await t.delete_many(keys)
    await store.refs.finish_claim(claim)
    await store.put_chunks(tenant.chunks(1), "standard")  # the writer's late copy
    result = await store.collect_garbage()
    assert result.claimed == 1
    assert await store.exists_many(keys) == [False]
