"""Eviction policies (victim choice) and placement resolution."""

from __future__ import annotations

import pytest

from kvaas.store import DEFAULT_PLACEMENT, ChunkKey, LRUPolicy, SizeAwarePolicy
from kvaas.store.policy import check_storage_class, resolve_placement


def k(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(32, "big"))


def test_lru_victims_oldest_first_in_bytes() -> None:
    p = LRUPolicy()
    for i in range(5):
        p.on_store("memory", k(i), 100)
    p.on_access("memory", k(0))  # 0 becomes the most recent
    assert p.victims("memory", 150) == [k(1), k(2)]  # enough bytes, no more
    assert p.victims("memory", 150, skip={k(1)}) == [k(2), k(3)]
    p.on_remove("memory", k(2))
    assert p.victims("memory", 10_000) == [k(1), k(3), k(4), k(0)]
    assert p.victims("disk", 100) == []  # tiers are tracked apart
    p.load("disk", [(k(9), 5), (k(8), 5)])  # oldest first
    assert p.victims("disk", 5) == [k(9)]


def test_size_aware_prefers_large_cold_chunks() -> None:
    p = SizeAwarePolicy()
    p.on_store("memory", k(1), 100)  # small
    p.on_store("memory", k(2), 10_000)  # large
    p.on_store("memory", k(3), 5_000)
    # LRU would pick k(1) first; GreedyDual-Size frees the bytes with one large victim
    assert p.victims("memory", 1000) == [k(2)]
    assert LRUPolicy().victims("memory", 1) == []
    # the victim stays tracked until its removal is reported
    assert p.victims("memory", 1000) == [k(2)]
    p.on_remove("memory", k(2))
    assert p.victims("memory", 1000) == [k(3)]
    # recency still counts: after the inflation rose, a re-accessed chunk outranks an old one
    p.victims("memory", 1)  # raises L to k(3)'s priority
    p.on_remove("memory", k(3))
    p.on_store("memory", k(4), 5_000)
    p.on_access("memory", k(1))
    assert p.victims("memory", 1, skip={k(4)}) == [k(1)]
    assert p.victims("memory", 1) == [k(4)]


def test_size_aware_skip_and_stale_entries() -> None:
    p = SizeAwarePolicy()
    for i in range(200):
        p.on_store("d", k(i), 100 + i)
    for i in range(200):
        p.on_access("d", k(i))  # many stale heap entries get compacted
    v = p.victims("d", 500, skip={k(199)})
    assert k(199) not in v and sum(100 + int.from_bytes(x, "big") for x in v) >= 500


def test_placement_resolution() -> None:
    full = resolve_placement(DEFAULT_PLACEMENT, ["memory", "redis", "disk"])
    assert full == {"hot": ("redis",), "standard": ("redis",), "cold": ("disk",)}
    embedded = resolve_placement(DEFAULT_PLACEMENT, ["memory", "disk"])
    assert embedded == {"hot": ("memory", "disk"), "standard": ("disk",), "cold": ("disk",)}
    only_mem = resolve_placement(DEFAULT_PLACEMENT, ["memory"])
    assert only_mem == {"hot": ("memory",), "standard": ("memory",), "cold": ("memory",)}
    with pytest.raises(ValueError):
        check_storage_class("lukewarm")
