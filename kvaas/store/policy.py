"""Placement and eviction policy, kept apart from the tiers.

- :data:`DEFAULT_PLACEMENT` maps a storage class to the tiers its chunks are written to.
- :class:`EvictionPolicy` decides *which* chunks leave a full tier (the tiered store decides
  whether they are demoted or dropped). :class:`LRUPolicy` (default) evicts least recently used
  first; :class:`SizeAwarePolicy` (GreedyDual-Size) prefers large, cold chunks, which frees a
  byte budget with fewer evictions. Both account in bytes: a request for room returns just
  enough victims to free the bytes asked for.
"""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, get_args

from kvaas.store.keys import ChunkKey

StorageClass = Literal["hot", "standard", "cold"]
STORAGE_CLASSES: tuple[StorageClass, ...] = get_args(StorageClass)


def check_storage_class(value: str) -> StorageClass:
    if value not in STORAGE_CLASSES:
        raise ValueError(f"unknown storage class {value!r}; choose one of {STORAGE_CLASSES}")
    return value


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a storage class lives.

    ``tiers``: every tier a write goes to, when all of them are configured; otherwise
    ``fallback`` (the configured ones among them). ``idle_demote_to``: where
    :meth:`~kvaas.store.tiered.TieredStore.demote_idle` moves idle chunks (``None``: never).
    ``overflow_to_lower``: when the first tier is full, write to the next lower tier instead of
    failing.
    """

    tiers: tuple[str, ...]
    fallback: tuple[str, ...]
    idle_demote_to: str | None = None
    overflow_to_lower: bool = False


DEFAULT_PLACEMENT: Mapping[StorageClass, Placement] = {
    "hot": Placement(tiers=("redis",), fallback=("memory", "disk")),
    "standard": Placement(
        tiers=("redis",), fallback=("disk",), idle_demote_to="disk", overflow_to_lower=True
    ),
    "cold": Placement(tiers=("disk",), fallback=("disk",)),
}


def resolve_placement(
    placement: Mapping[StorageClass, Placement], tier_names: Collection[str]
) -> dict[StorageClass, tuple[str, ...]]:
    """Each class's write tiers among ``tier_names`` (the lowest tier if nothing else fits)."""
    if not tier_names:
        raise ValueError("a store needs at least one tier")
    order = list(tier_names)
    out: dict[StorageClass, tuple[str, ...]] = {}
    for cls in STORAGE_CLASSES:
        p = placement[cls]
        if all(t in tier_names for t in p.tiers):
            chosen = p.tiers
        else:
            chosen = tuple(t for t in p.fallback if t in tier_names) or (order[-1],)
        out[cls] = tuple(sorted(chosen, key=order.index))
    return out


class EvictionPolicy(ABC):
    """Tracks what each capacity-bounded tier holds and picks eviction victims.

    The tiered store reports every store, access and removal; the policy never touches tiers.
    """

    @abstractmethod
    def on_store(self, tier: str, key: ChunkKey, size: int) -> None: ...

    @abstractmethod
    def on_access(self, tier: str, key: ChunkKey) -> None: ...

    @abstractmethod
    def on_remove(self, tier: str, key: ChunkKey) -> None: ...

    @abstractmethod
    def victims(
        self, tier: str, need_bytes: int, skip: Collection[ChunkKey] = ()
    ) -> list[ChunkKey]:
        """Chunks to evict from ``tier``, best victim first, whose sizes add up to at least
        ``need_bytes`` (fewer if the tier holds less); ``skip`` lists chunks that must stay."""

    def load(self, tier: str, entries: Iterable[tuple[ChunkKey, int]]) -> None:
        """Seed with a tier's existing chunks, least recently used first."""
        for key, size in entries:
            self.on_store(tier, key, size)

    def on_remove_many(self, tier: str, keys: Iterable[ChunkKey]) -> None:
        for k in keys:
            self.on_remove(tier, k)


class LRUPolicy(EvictionPolicy):
    """Least recently used first, in bytes."""

    def __init__(self) -> None:
        self._lru: dict[str, OrderedDict[ChunkKey, int]] = {}

    def _tier(self, tier: str) -> OrderedDict[ChunkKey, int]:
        od = self._lru.get(tier)
        if od is None:
            od = self._lru[tier] = OrderedDict()
        return od

    def on_store(self, tier: str, key: ChunkKey, size: int) -> None:
        od = self._tier(tier)
        od[key] = size
        od.move_to_end(key)

    def on_access(self, tier: str, key: ChunkKey) -> None:
        od = self._tier(tier)
        if key in od:
            od.move_to_end(key)

    def on_remove(self, tier: str, key: ChunkKey) -> None:
        self._tier(tier).pop(key, None)

    def victims(
        self, tier: str, need_bytes: int, skip: Collection[ChunkKey] = ()
    ) -> list[ChunkKey]:
        out: list[ChunkKey] = []
        freed = 0
        for key, size in self._tier(tier).items():
            if freed >= need_bytes:
                break
            if key in skip:
                continue
            out.append(key)
            freed += size
        return out


_Entries = dict[ChunkKey, tuple[float, int, int]]  # key -> (priority, sequence, size)
_Heap = list[tuple[float, int, ChunkKey]]


class SizeAwarePolicy(EvictionPolicy):
    """GreedyDual-Size: priority ``H = L + 1 / size`` refreshed on access; the lowest ``H`` goes
    first and ``L`` rises to each victim's ``H``. Large chunks leave before small ones of the
    same age; recently used ones stay. Lazy deletion keeps operations ``O(log n)``.
    """

    def __init__(self) -> None:
        self._state: dict[str, tuple[_Entries, _Heap]] = {}
        self._inflation: dict[str, float] = {}
        self._seq = itertools.count()

    def _tier(self, tier: str) -> tuple[_Entries, _Heap]:
        st = self._state.get(tier)
        if st is None:
            st = self._state[tier] = ({}, [])
            self._inflation[tier] = 0.0
        return st

    def _push(self, tier: str, key: ChunkKey, size: int) -> None:
        entries, heap = self._tier(tier)
        h = self._inflation[tier] + 1.0 / max(size, 1)
        seq = next(self._seq)
        entries[key] = (h, seq, size)
        heapq.heappush(heap, (h, seq, key))
        if len(heap) > 4 * len(entries) + 64:  # drop stale heap entries
            heap[:] = [(h, s, k) for k, (h, s, _) in entries.items()]
            heapq.heapify(heap)

    def on_store(self, tier: str, key: ChunkKey, size: int) -> None:
        self._push(tier, key, size)

    def on_access(self, tier: str, key: ChunkKey) -> None:
        entries, _ = self._tier(tier)
        if key in entries:
            self._push(tier, key, entries[key][2])

    def on_remove(self, tier: str, key: ChunkKey) -> None:
        self._tier(tier)[0].pop(key, None)

    def victims(
        self, tier: str, need_bytes: int, skip: Collection[ChunkKey] = ()
    ) -> list[ChunkKey]:
        entries, heap = self._tier(tier)
        out: list[ChunkKey] = []
        held: list[tuple[float, int, ChunkKey]] = []
        freed = 0
        while heap and freed < need_bytes:
            item = heapq.heappop(heap)
            h, seq, key = item
            current = entries.get(key)
            if current is None or current[1] != seq:
                continue  # stale: removed or re-prioritized since
            held.append(item)  # victims stay tracked until the store reports their removal
            if key in skip:
                continue
            out.append(key)
            freed += current[2]
            self._inflation[tier] = max(self._inflation[tier], h)
        for item in held:
            heapq.heappush(heap, item)
        return out
