"""Where a cache's chunks are: which are gone from every tier, and the bytes kept per tier.

- :func:`lost_chunks` answers whether a manifest's chunks still exist somewhere (after a Redis
  restart that lost recent writes, an eviction by a misconfigured server, a disk replaced): the
  caller marks such a cache ``evicted`` and stops billing its storage. A tier that cannot answer
  makes the answer *uncertain*, never "lost".
- :func:`bytes_by_tier` is what storage billing charges per tier: each chunk once, in the
  highest shared tier holding it (the memory tier is a process-local cache, not billed).
- :class:`TierMoves` is the store's journal of chunks that moved between billed tiers (spill
  to a lower tier on write, demotion on eviction or when idle, promotion, class changes): the
  billing loop drains it to know which tenants' caches to re-measure, and since when.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvaas.store.errors import StoreError, TierUnavailable
from kvaas.store.keys import SLOT_BYTES, ChunkKey
from kvaas.store.manifest import Manifest

if TYPE_CHECKING:
    from kvaas.store.tiered import TieredStore


@dataclass(frozen=True, slots=True)
class ChunkPresence:
    """What :func:`lost_chunks` found for one manifest.

    ``missing``: chunks no tier that answered holds, in manifest order. ``unknown_tiers``: the
    tiers that could not answer (down); while it is not empty a missing chunk may still be in
    one of them. ``lost`` is the verdict a caller acts on: some chunk is gone and every tier
    answered."""

    total: int
    missing: tuple[ChunkKey, ...]
    unknown_tiers: tuple[str, ...]

    @property
    def lost(self) -> bool:
        return bool(self.missing) and not self.unknown_tiers

    @property
    def complete(self) -> bool:
        return not self.missing


async def lost_chunks(store: TieredStore, manifest: Manifest) -> ChunkPresence:
    """Which of ``manifest``'s chunks are gone from every tier (presence, one batched call per
    tier, top-down, each asked only for what the tiers above did not hold)."""
    keys = list(dict.fromkeys(manifest.chunk_keys))
    pending = keys
    unknown: list[str] = []
    for tier in store.tiers:
        if not pending:
            break
        try:
            found = await store._call(tier, "exists", tier.exists_many(pending))
        except StoreError:
            unknown.append(tier.name)
            continue
        pending = [k for k, hit in zip(pending, found, strict=True) if not hit]
    gone = set(pending)
    missing = tuple(k for k in manifest.chunk_keys if k in gone)
    return ChunkPresence(len(manifest.chunk_keys), missing, tuple(unknown))


async def bytes_by_tier(store: TieredStore, keys: Iterable[ChunkKey]) -> dict[str, int]:
    """Bytes of the distinct ``keys`` per billed tier: each chunk counts once, in the highest
    shared tier that holds it; chunks held by no shared tier count nowhere. Raises
    :class:`TierUnavailable` when a shared tier cannot answer (the measure would be wrong)."""
    pending = list(dict.fromkeys(keys))
    out: dict[str, int] = {}
    for tier in store.tiers:
        if not tier.shared or not pending:
            continue
        try:
            sizes = await store._call(tier, "sizes", tier.sizes_many(pending))
        except TierUnavailable:
            raise
        except StoreError as e:
            raise TierUnavailable(tier.name, f"tier {tier.name!r} cannot measure: {e}") from e
        still = []
        for k, size in zip(pending, sizes, strict=True):
            if size:
                out[tier.name] = out.get(tier.name, 0) + int(size)
            else:
                still.append(k)
        pending = still
    return out


class TierMoves:
    """Tenants (namespace slots) whose chunks moved between billed tiers, with the time of the
    earliest move not yet drained. In-process and bounded (``max_slots``: beyond it the oldest
    entries are kept and the overflow is flagged, so the billing loop re-measures every
    tenant)."""

    def __init__(self, max_slots: int = 100_000) -> None:
        self.max_slots = max_slots
        self._since: dict[str, float] = {}
        self.overflowed = False

    def record(self, keys: Sequence[ChunkKey], at: float | None = None) -> None:
        """Chunks ``keys`` moved at ``at`` (default now, epoch seconds)."""
        if not keys:
            return
        at = time.time() if at is None else at
        for k in keys:
            slot = k[:SLOT_BYTES].hex()
            if slot in self._since:
                continue
            if len(self._since) >= self.max_slots:
                self.overflowed = True
                return
            self._since[slot] = at

    def drain(self) -> tuple[dict[str, float], bool]:
        """The slots that moved (slot -> earliest move time) and whether the journal overflowed;
        the journal starts empty again."""
        out, over = self._since, self.overflowed
        self._since, self.overflowed = {}, False
        return out, over

    def restore(self, slots: dict[str, float]) -> None:
        """Put back slots a billing round could not finish (kept with their earliest time)."""
        for slot, at in slots.items():
            self._since[slot] = min(at, self._since.get(slot, at))

    def __len__(self) -> int:
        return len(self._since)
