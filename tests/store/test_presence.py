"""Which chunks of a manifest are gone from every tier, the bytes billed per tier, and the
journal of tier moves that storage billing drains."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvaas.store import TieredStore


async def test_chunks_lost_from_every_tier_are_reported(
    make_store: Callable[..., TieredStore], tenant: Any
) -> None:
    """A Redis that lost recent writes (restart without persistence, eviction): the manifest
    survives elsewhere but its chunks are gone; the store says which."""
    store = make_store(memory=None)
    await store.open()
    chunks = tenant.chunks(3)
    m = tenant.manifest([k for k, _ in chunks])
    await store.put_manifest(m)
    await store.put_chunks(chunks, "standard")
    assert (await store.lost_chunks(m)).complete
    lost = [chunks[1][0], chunks[2][0]]
    await store.tier("redis").delete_many(lost)  # what a restart that lost them leaves
    p = await store.lost_chunks(m)
    assert p.lost and p.missing == tuple(lost) and p.total == 3 and not p.unknown_tiers


async def test_a_tier_that_cannot_answer_makes_the_answer_uncertain(
    make_store: Callable[..., TieredStore], make_conn: Callable[..., Any], tenant: Any
) -> None:
    store = make_store(memory=None, conn=make_conn("redis://127.0.0.1:1/0"), index="sqlite")
    await store.open()
    m = tenant.manifest(tenant.keys(2))
    p = await store.lost_chunks(m)
    assert p.missing == m.chunk_keys and p.unknown_tiers == ("redis",)
    assert not p.lost  # maybe in Redis: never declared lost while Redis cannot answer


async def test_spill_to_disk_is_journaled_and_billed_on_disk(
    make_store: Callable[..., TieredStore], make_conn: Callable[..., Any], tenant: Any
) -> None:
    """Redis down: a standard write spills to disk; the move is journaled for billing and the
    bytes are measured on disk, not in Redis."""
    store = make_store(memory=None, conn=make_conn("redis://127.0.0.1:1/0"), index="sqlite")
    await store.open()
    chunks = tenant.chunks(2, size=3000)
    await store.put_manifest(tenant.manifest([k for k, _ in chunks]))
    await store.put_chunks(chunks, "standard")
    moved, overflowed = store.moves.drain()
    assert set(moved) == {tenant.slot} and not overflowed
    assert len(store.moves) == 0


async def test_bytes_by_tier_follow_idle_demotion(
    make_store: Callable[..., TieredStore], tenant: Any
) -> None:
    store = make_store()  # memory, Redis, disk: memory copies are not billed
    await store.open()
    chunks = tenant.chunks(3, size=3000)
    keys = [k for k, _ in chunks]
    await store.put_manifest(tenant.manifest(keys))
    await store.put_chunks(chunks, "standard")
    size = sum(await store.tier("redis").sizes_many(keys))  # type: ignore[arg-type]
    assert await store.bytes_by_tier(keys + keys[:1]) == {"redis": size}  # each chunk once
    assert len(store.moves) == 0  # written where its class lives: no move
    assert await store.demote_idle(0) == 3
    assert await store.bytes_by_tier(keys) == {"disk": size}
    moved, _ = store.moves.drain()
    assert tenant.slot in moved
