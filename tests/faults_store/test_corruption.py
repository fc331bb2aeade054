"""Corruption in every tier (memory, Redis, disk) of an encrypted store, as the service runs
it: a flipped byte anywhere in the sealed blob (header, nonce, ciphertext, tag), a truncated
blob, and a valid blob moved under another key. Every case is detected, counted per tier,
removed from that tier and read as a miss (a good copy below is used instead); never wrong
bytes. A plaintext store (benchmarks only) detects altered bytes by the container's checksum.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY

from kvaas.store import DiskTier, TieredStore
from kvaas.store.crypto import HEADER_BYTES
from kvaas.store.keys import ChunkKey

TIERS = ["memory", "redis", "disk"]
CORRUPTIONS = ["flip-header", "flip-nonce", "flip-ciphertext", "flip-tag", "truncate", "moved"]


def corrupt_reads(tier: str) -> float:
    return REGISTRY.get_sample_value("kvaas_store_corrupt_reads_total", {"tier": tier}) or 0.0


def corrupt(kind: str, blob: bytes, other: bytes) -> bytes:
    """``blob`` altered as ``kind`` says (``other``: another chunk's valid sealed blob)."""
    if kind == "moved":
        return other
    if kind == "truncate":
        return blob[: len(blob) // 2]
    offset = {
        "flip-header": 3,
        "flip-nonce": HEADER_BYTES - 2,
        "flip-ciphertext": HEADER_BYTES + 100,
        "flip-tag": len(blob) - 1,
    }[kind]
    raw = bytearray(blob)
    raw[offset] ^= 0x40
    return bytes(raw)


async def _plant(store: TieredStore, tier_name: str, key: ChunkKey, blob: bytes) -> None:
    """Make ``blob`` the stored bytes of ``key`` in one tier (a real file for the disk)."""
    tier = store.tier(tier_name)
    await tier.delete_many([key])
    if isinstance(tier, DiskTier):
        path = tier.path_of(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    else:
        await tier.put_many([(key, blob)])


@pytest.mark.parametrize("kind", CORRUPTIONS)
@pytest.mark.parametrize("tier_name", TIERS)
async def test_corruption_is_detected_counted_and_a_miss(
    make_store: Callable[..., TieredStore], tenant: Any, tier_name: str, kind: str
) -> None:
    store = make_store(encrypted=True)
    await store.open()
    sealer = tenant.sealer()
    chunks = tenant.chunks(3)
    keys = [k for k, _ in chunks]
    sealed = [sealer.seal(k, b) for k, b in chunks]
    # chunk 0 lives only in the tier under test, as ``kind`` altered it
    await _plant(store, tier_name, keys[0], corrupt(kind, sealed[0], sealed[2]))
    for t in TIERS:
        if t != tier_name:
            await store.tier(t).delete_many([keys[0]])
    await store.tier("disk").put_many(list(zip(keys[1:], sealed[1:], strict=True)))
    before = corrupt_reads(tier_name)
    assert await store.get_prefix(keys, sealer) == []  # a miss, never the altered bytes
    assert corrupt_reads(tier_name) - before == 1
    assert await store.tier(tier_name).exists_many([keys[0]]) == [False]  # removed
    # again, with a good copy below the tier under test (the disk for memory and Redis)
    if tier_name != "disk":
        await _plant(store, tier_name, keys[0], corrupt(kind, sealed[0], sealed[2]))
        await store.tier("disk").put_many([(keys[0], sealed[0])])
        before = corrupt_reads(tier_name)
        assert await store.get_prefix(keys, sealer) == [b for _, b in chunks]
        assert corrupt_reads(tier_name) - before == 1


@pytest.mark.parametrize("tier_name", TIERS)
async def test_plaintext_store_detects_altered_bytes_by_checksum(
    make_store: Callable[..., TieredStore], tenant: Any, tier_name: str
) -> None:
    store = make_store()  # plaintext containers (benchmarks): the checksum is the guard
    await store.open()
    chunks = tenant.chunks(2)
    keys = [k for k, _ in chunks]
    raw = bytearray(chunks[0][1])
    raw[len(raw) // 2] ^= 0x01
    await _plant(store, tier_name, keys[0], bytes(raw))
    before = corrupt_reads(tier_name)
    assert await store.get_prefix(keys) == []
    assert corrupt_reads(tier_name) - before == 1
