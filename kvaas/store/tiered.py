"""The tiered store: ordered tiers (top = fastest, e.g. memory → Redis → disk), one API.

(This module is longer than most, ~930 lines, on purpose: it is one class whose reads,
promotion, writes, eviction, demotion, manifests and garbage collection share the per-tier
locks, the eviction policy and the tier metrics; split apart, each piece would reach into the
others' private state.)

Contracts:

- **Encryption** (``encrypted=True``, the default; see :mod:`kvaas.store.crypto`): chunks are
  sealed once, by :meth:`TieredStore.put_chunks` with the caller's
  :class:`~kvaas.store.crypto.ChunkSealer`, and opened by :meth:`TieredStore.get_prefix` with
  it; both refuse to run without one (:class:`~kvaas.store.errors.ConfigurationError`). Every
  tier holds the sealed bytes, the memory tier included; moves between tiers copy them as they
  are. A store built with ``encrypted=False`` keeps plain codec containers (and refuses sealers).
- **Reads** go top-down. :meth:`TieredStore.get_prefix` asks each tier once, with one batched
  call, for the keys still missing above it, verifies every blob (AES-GCM authentication of the
  sealed chunk against its key, or the codec container's checksum in a plaintext store), and
  returns the verified blobs of the longest prefix found. A corrupt blob (one that fails
  authentication: altered, or moved under another key) is counted, deleted from its tier and
  treated as a miss there (a lower tier may still hold a good copy); a blob sealed under a key
  the sealer does not hold is counted apart and left in place. A chunk missing from every tier
  ends the prefix. Never wrong bytes. A tier that fails (Redis down) is skipped: reads keep
  serving from the others.
- **Promotion**: a chunk found below the top is copied into the tiers above it that are caches
  (not ``shared``: the memory tier) or belong to the placement of a storage class referencing it.
  Best effort: a promotion that fails (no room, tier down) is skipped, never an error.
- **Writes** (:meth:`TieredStore.put_chunks`) go to the tiers the storage class's
  :class:`~kvaas.store.policy.Placement` names. When a capacity-bounded tier is full, the
  eviction policy picks victims; a victim still referenced by a manifest and held by no lower
  tier is *demoted* (copied to the next lower tier that accepts it) before it leaves, an
  unreferenced one (or one with a copy below) is dropped. The bottom tier never drops a
  referenced chunk: when no room can be made the write raises
  :class:`~kvaas.store.errors.StorageFull`. A class whose placement has ``overflow_to_lower``
  (``standard``) falls back to the next lower tier when its tier is full or down; otherwise a
  down required tier raises :class:`~kvaas.store.errors.TierUnavailable` (fast: the Redis
  connection's circuit breaker).
- **Manifests and GC** follow the protocol in :mod:`kvaas.store.refs`: :meth:`put_manifest`
  takes the references before the caller writes the chunks (so call ``put_manifest`` *first*,
  then ``put_chunks``), and waits (bounded) while a collector is deleting any of them.
- The store is bound to one event loop and is not thread-safe; use
  :class:`~kvaas.store.sync.SyncTieredStore` from plain threads. The one exception is
  :meth:`TieredStore.memory_prefix` (a read of the memory tier alone, from any thread).

Eviction bookkeeping (the policy) is per process: chunks another process wrote into a shared
disk directory are only known to this process's policy once it meets them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from kvaas.codec import CodecError, verify_blob
from kvaas.store import metrics as m
from kvaas.store.crypto import ChunkSealer, ForeignSeal, SealError, check_envelope
from kvaas.store.errors import (
    BlobTooLarge,
    ConfigurationError,
    StorageFull,
    StoreError,
    TierUnavailable,
)
from kvaas.store.keys import ChunkKey, longest_stored_prefix
from kvaas.store.manifest import Manifest
from kvaas.store.memory import MemoryTier
from kvaas.store.policy import (
    DEFAULT_PLACEMENT,
    EvictionPolicy,
    LRUPolicy,
    Placement,
    StorageClass,
    check_storage_class,
    resolve_placement,
)
from kvaas.store.presence import ChunkPresence, TierMoves, bytes_by_tier, lost_chunks
from kvaas.store.refs import GCResult, RefCounts, RefIndex
from kvaas.store.tier import Blob, Tier, TierHealth

T = TypeVar("T")
#: Told the seconds one read spent in a stage (``stage`` or ``stage:tier``).
StageTimes = Callable[[str, float], None]
#: told, per tier name, how many of a read's chunks that tier served
TierHits = Callable[[str, int], None]

MOVE_BATCH = 64
"""Chunks moved per batch by class changes and idle demotion (bounds memory use)."""


class TieredStore:
    """Chunks in ordered tiers plus a reference index (see the module docstring).

    ``tiers`` are ordered top (fastest) → bottom; their names must be unique and are what
    ``placement`` refers to (``memory``, ``redis``, ``disk`` by default). ``max_chunk_bytes``
    (optional) rejects bigger blobs with :class:`BlobTooLarge`; each tier also rejects blobs
    larger than its whole budget. ``tombstone_wait_s`` bounds how long :meth:`put_manifest` waits
    for a collector that is deleting chunks the manifest references. ``encrypted`` (default)
    makes the store hold sealed chunks only (see the module docstring).
    """

    def __init__(
        self,
        tiers: Sequence[Tier],
        refs: RefIndex,
        *,
        policy: EvictionPolicy | None = None,
        placement: Mapping[StorageClass, Placement] = DEFAULT_PLACEMENT,
        max_chunk_bytes: int | None = None,
        tombstone_wait_s: float = 10.0,
        encrypted: bool = True,
    ) -> None:
        if not tiers:
            raise ConfigurationError("a tiered store needs at least one tier")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"tier names must be unique, got {names}")
        for t in tiers:
            if (
                t.capacity is not None
                and max_chunk_bytes is not None
                and t.capacity < max_chunk_bytes
            ):
                raise ConfigurationError(
                    f"tier {t.name!r}: its {t.capacity}-byte budget cannot hold one "
                    f"{max_chunk_bytes}-byte chunk"
                )
        if max_chunk_bytes is not None and max_chunk_bytes <= 0:
            raise ConfigurationError("max_chunk_bytes must be positive")
        self.tiers: tuple[Tier, ...] = tuple(tiers)
        self.refs = refs
        self.policy: EvictionPolicy = policy or LRUPolicy()
        self.placement: dict[StorageClass, Placement] = dict(placement)
        self.write_tiers = resolve_placement(self.placement, names)
        """Each storage class's write tiers among the configured ones, top-down."""
        self.max_chunk_bytes = max_chunk_bytes
        self.tombstone_wait_s = tombstone_wait_s
        self.encrypted = encrypted
        self._index = {t.name: i for i, t in enumerate(self.tiers)}
        self._locks: dict[str, asyncio.Lock] = {}
        self._opened = False
        self.moves = TierMoves()
        """Tenants whose chunks moved between billed tiers (drained by storage billing)."""

    # -- lifecycle ---------------------------------------------------------------------------
    async def open(self) -> None:
        """Open every tier, seed the eviction policy with what bounded tiers already hold, and
        open the index (which refuses a Redis whose eviction policy could drop index keys:
        :class:`~kvaas.store.errors.ConfigurationError`)."""
        for tier in self.tiers:
            entries = await tier.open()
            if tier.capacity is not None:
                self.policy.load(tier.name, entries)
            m.TIER_UP.labels(tier.name).set(1)
        await self.refs.open()
        self._opened = True

    async def close(self) -> None:
        """Close the tiers and the index (shared connections are closed once)."""
        for tier in self.tiers:
            with contextlib.suppress(StoreError, OSError):
                await tier.close()
        with contextlib.suppress(StoreError, OSError):
            await self.refs.close()

    async def __aenter__(self) -> TieredStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def tier(self, name: str) -> Tier:
        """The tier called ``name`` (``KeyError`` if absent)."""
        return self.tiers[self._index[name]]

    # -- plumbing ----------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _timed(self, tier: Tier, op: str) -> AsyncIterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        except TierUnavailable:
            m.ERRORS.labels(tier.name, op).inc()
            m.TIER_UP.labels(tier.name).set(0)
            raise
        except StoreError:
            m.ERRORS.labels(tier.name, op).inc()
            raise
        else:
            if tier.shared:
                m.TIER_UP.labels(tier.name).set(1)
        finally:
            m.LATENCY.labels(tier.name, op).observe(time.perf_counter() - t0)

    async def _call(self, tier: Tier, op: str, aw: Awaitable[T]) -> T:
        async with self._timed(tier, op):
            return await aw

    def _lock(self, tier: Tier) -> asyncio.Lock:
        lock = self._locks.get(tier.name)
        if lock is None:
            lock = self._locks[tier.name] = asyncio.Lock()
        return lock

    def _check_sealer(self, sealer: ChunkSealer | None) -> None:
        if self.encrypted and sealer is None:
            raise ConfigurationError(
                "this store holds encrypted chunks only: reads and writes need the tenant's "
                "chunk sealer (its keys come with the transfer plan)"
            )
        if not self.encrypted and sealer is not None:
            raise ConfigurationError("this store is configured without encryption")

    def _verify(self, key: ChunkKey, blob: Blob, sealer: ChunkSealer | None) -> bytes:
        """What ``blob``, stored under ``key``, reads as: opened with ``sealer`` (and the
        container's checksum checked); without one, the blob itself once its structure (sealed
        store: authenticated on open) or checksum (plaintext store) is checked. Raises
        :class:`SealError` or :class:`CodecError`."""
        if sealer is not None:
            chunk = sealer.open(key, blob)
            verify_blob(chunk)
            return chunk
        if self.encrypted:
            check_envelope(blob)
        else:
            verify_blob(blob)
        return blob if isinstance(blob, bytes) else bytes(blob)

    def _check_sizes(self, items: Sequence[tuple[ChunkKey, Blob]]) -> None:
        if self.max_chunk_bytes is None:
            return
        for _, blob in items:
            if len(blob) > self.max_chunk_bytes:
                raise BlobTooLarge(
                    f"a {len(blob)}-byte chunk exceeds the store's {self.max_chunk_bytes}-byte "
                    "chunk limit"
                )

    # -- reads -------------------------------------------------------------------------------
    async def exists_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Whether each key is present in some tier (presence, not integrity).

        One batched call per tier, top-down, each asking only for the keys not found above. A
        tier that cannot answer is skipped.
        """
        found = await self._top_down("exists", keys, lambda t, ks: t.exists_many(ks))
        return [bool(f) for f in found]

    async def sizes_many(self, keys: Sequence[ChunkKey]) -> list[int | None]:
        """Stored size of each key in the highest tier that holds it (``None``: no tier).

        Same batching as :meth:`exists_many`."""
        return await self._top_down("sizes", keys, lambda t, ks: t.sizes_many(ks))

    async def _top_down(
        self,
        op: str,
        keys: Sequence[ChunkKey],
        call: Callable[[Tier, list[ChunkKey]], Awaitable[Sequence[Any]]],
    ) -> list[Any]:
        """``call`` on each tier, top-down, for the keys no tier above answered (a falsy
        answer is no answer); a tier that cannot answer is skipped. Returns the first truthy
        answer per key, ``None`` where there is none."""
        out: list[Any] = [None] * len(keys)
        pending = list(range(len(keys)))
        for tier in self.tiers:
            if not pending:
                break
            try:
                res = await self._call(tier, op, call(tier, [keys[i] for i in pending]))
            except StoreError:
                continue
            still = []
            for i, ans in zip(pending, res, strict=True):
                if ans:
                    out[i] = ans
                else:
                    still.append(i)
            pending = still
        return out

    async def longest_prefix(self, keys: Sequence[ChunkKey]) -> int:
        """Number of leading ``keys`` present in some tier (one batched call per tier)."""
        return await longest_stored_prefix(self, keys)

    async def _fetch(
        self,
        keys: Sequence[ChunkKey],
        sealer: ChunkSealer | None = None,
        timed: StageTimes | None = None,
    ) -> tuple[list[bytes | None], list[bytes | None], list[int]]:
        """The stored blobs of ``keys`` that verify (``None`` where no tier has a good copy),
        what each reads as (:meth:`_verify`) and the index of the tier each came from (-1 where
        none). One batched get per tier, top-down. ``timed`` (optional) is told the seconds
        spent per stage: ``fetch:<tier>`` per tier asked, ``verify`` (opening and checking)."""
        stored: list[bytes | None] = [None] * len(keys)
        opened: list[bytes | None] = [None] * len(keys)
        where = [-1] * len(keys)
        pending = list(range(len(keys)))
        for ti, tier in enumerate(self.tiers):
            if not pending:
                break
            t0 = time.perf_counter()
            try:
                got = await self._call(tier, "get", tier.get_many([keys[i] for i in pending]))
            except StoreError:
                continue
            finally:
                if timed is not None:
                    timed(f"fetch:{tier.name}", time.perf_counter() - t0)
            t0 = time.perf_counter()
            still: list[int] = []
            corrupt: list[ChunkKey] = []
            foreign = 0
            for i, blob in zip(pending, got, strict=True):
                if blob is None:
                    still.append(i)
                    continue
                try:
                    opened[i] = self._verify(keys[i], blob, sealer)
                except ForeignSeal:
                    foreign += 1
                    still.append(i)
                    continue
                except (SealError, CodecError):
                    corrupt.append(keys[i])
                    still.append(i)
                    continue
                stored[i] = blob if isinstance(blob, bytes) else bytes(blob)
                where[i] = ti
            if timed is not None:
                timed("verify", time.perf_counter() - t0)
            hits = len(pending) - len(still)
            if hits:
                m.HITS.labels(tier.name).inc(hits)
            if len(still) - len(corrupt) - foreign:
                m.MISSES.labels(tier.name).inc(len(still) - len(corrupt) - foreign)
            if foreign:
                m.FOREIGN_SEALS.labels(tier.name).inc(foreign)
            if corrupt:
                m.CORRUPT_READS.labels(tier.name).inc(len(corrupt))
                await self._discard(tier, corrupt)
            pending = still
        return stored, opened, where

    async def _discard(self, tier: Tier, keys: Sequence[ChunkKey]) -> None:
        """Best-effort delete of bad blobs from one tier."""
        with contextlib.suppress(StoreError):
            await self._call(tier, "delete", tier.delete_many(list(keys)))
        if tier.capacity is not None:
            self.policy.on_remove_many(tier.name, keys)

    async def get_prefix(
        self,
        keys: Sequence[ChunkKey],
        sealer: ChunkSealer | None = None,
        timed: StageTimes | None = None,
        found: TierHits | None = None,
    ) -> list[bytes]:
        """The verified chunks (codec containers) of the longest prefix of ``keys`` held by the
        store, opened with ``sealer`` (required by an encrypted store). ``found`` (optional)
        is told how many of the chunks returned each tier served.

        All keys are fetched concurrently in one batched call per tier (top-down, each tier
        asked only for what the tiers above missed); a chunk absent, corrupt or unreadable in
        every tier ends the prefix. Hits below the top are promoted as stored (sealed), best
        effort, see the module docstring. ``timed`` (optional) is told the seconds spent per
        stage: ``fetch:<tier>``, ``verify`` and ``promote``.
        """
        self._check_sealer(sealer)
        if not keys:
            return []
        stored, opened, where = await self._fetch(keys, sealer, timed)
        cut = next((i for i, b in enumerate(stored) if b is None), len(keys))
        blobs: list[bytes] = []
        out: list[bytes] = []
        for i in range(cut):
            blob, chunk = stored[i], opened[i]
            assert blob is not None and chunk is not None
            tier = self.tiers[where[i]]
            if tier.capacity is not None:
                self.policy.on_store(tier.name, keys[i], len(blob))  # a touch, tracks adoptees
            blobs.append(blob)
            out.append(chunk)
        if found is not None:
            for ti in sorted(set(where[:cut])):
                found(self.tiers[ti].name, where[:cut].count(ti))
        if any(where[i] > 0 for i in range(cut)):
            t0 = time.perf_counter()
            await self._promote(keys[:cut], blobs, where[:cut])
            if timed is not None:
                timed("promote", time.perf_counter() - t0)
        return out

    def memory_prefix(
        self,
        keys: Sequence[ChunkKey],
        sealer: ChunkSealer | None = None,
        timed: StageTimes | None = None,
        found: TierHits | None = None,
    ) -> tuple[list[bytes], Callable[[], None]] | None:
        """:meth:`get_prefix` when the top tier is this process's memory tier and holds
        every one of ``keys`` with a blob that verifies: the chunks, and the eviction
        policy's bookkeeping for them, to be run on the store's loop. ``None`` otherwise
        (the caller then calls :meth:`get_prefix`, which also deals with bad blobs).

        The one method callable from any thread (see :class:`~kvaas.store.sync.SyncTieredStore`):
        it only reads the memory tier (:meth:`MemoryTier.peek_many`), verifies on the caller's
        thread and counts hits; nothing of the store's state is changed here."""
        top = self.tiers[0] if self.tiers else None
        if not isinstance(top, MemoryTier) or not keys:
            return None
        self._check_sealer(sealer)
        t0 = time.perf_counter()
        blobs = top.peek_many(keys)
        if timed is not None:
            timed(f"fetch:{top.name}", time.perf_counter() - t0)
        if any(b is None for b in blobs):
            return None
        t0 = time.perf_counter()
        out: list[bytes] = []
        for key, blob in zip(keys, blobs, strict=True):
            assert blob is not None
            try:
                out.append(self._verify(key, blob, sealer))
            except (SealError, CodecError):  # incl. a foreign seal: the full path counts it
                return None
        if timed is not None:
            timed("verify", time.perf_counter() - t0)
        m.HITS.labels(top.name).inc(len(keys))
        if found is not None:
            found(top.name, len(keys))
        sizes = [len(b) for b in blobs if b is not None]
        name, capacity = top.name, top.capacity

        def touch() -> None:  # what get_prefix does for a hit in a bounded tier
            if capacity is not None:
                for key, size in zip(keys, sizes, strict=True):
                    if top.peek_many([key])[0] is not None:  # not deleted meanwhile
                        self.policy.on_store(name, key, size)

        return out, touch

    async def _promote(
        self, keys: Sequence[ChunkKey], blobs: Sequence[bytes], where: Sequence[int]
    ) -> None:
        lower = [i for i, w in enumerate(where) if w > 0]
        classes: list[tuple[StorageClass, ...]] = [()] * len(keys)
        if any(self.tiers[j].shared for i in lower for j in range(where[i])):
            try:  # placement-based promotion needs the chunks' storage classes
                counts = await self.refs.ref_counts([keys[i] for i in lower])
            except StoreError:
                counts = [RefCounts()] * len(lower)
            for i, c in zip(lower, counts, strict=True):
                classes[i] = c.classes()
        per_tier: dict[int, list[tuple[ChunkKey, Blob]]] = {}
        for i in lower:
            wanted = {n for cls in classes[i] for n in self.write_tiers[cls]}
            for j in range(where[i]):
                t = self.tiers[j]
                if not t.shared or t.name in wanted:
                    per_tier.setdefault(j, []).append((keys[i], blobs[i]))
        copied: list[ChunkKey] = []
        for j, items in sorted(per_tier.items()):
            tier = self.tiers[j]
            try:
                await self._store_in(tier, items)
            except StoreError:
                continue  # best effort: no room or tier down
            m.PROMOTIONS.labels(tier.name).inc(len(items))
            if tier.shared:
                copied.extend(k for k, _ in items)
        self.moves.record(copied)
        await self._requeue(copied)

    async def _requeue(self, keys: Sequence[ChunkKey]) -> None:
        """After copying chunks into a shared tier without holding a reference: let GC find
        the copies of chunks that were released meanwhile (see :mod:`kvaas.store.refs`)."""
        if keys:
            with contextlib.suppress(StoreError):
                await self.refs.requeue_unreferenced(list(dict.fromkeys(keys)))

    # -- writes ------------------------------------------------------------------------------
    async def put_chunks(
        self,
        items: Sequence[tuple[ChunkKey, bytes]],
        storage_class: str,
        sealer: ChunkSealer | None = None,
        *,
        warm: bool = False,
    ) -> int:
        """Write chunks (codec containers) to the tiers of ``storage_class``, sealed once with
        ``sealer`` (required by an encrypted store); return the bytes newly stored, summed over
        the tiers written (chunks already present count 0). Sizes, budgets and
        ``max_chunk_bytes`` apply to the sealed blobs.

        ``warm``: also keep them in this process's memory tier when the class does not write
        there (best effort, not counted: it is a cache of what the class's tiers hold). An
        engine worker saving a cache warms its own memory tier, so the attaches that routing
        sends back to the same node find the chunks there.

        Call :meth:`put_manifest` for the cache version first (references before writes, see
        :mod:`kvaas.store.refs`). Raises :class:`BlobTooLarge`, :class:`StorageFull` when no
        room can be made, :class:`TierUnavailable` when a required tier is down. A class with
        ``overflow_to_lower`` (``standard``) writes to the next lower tier instead when its tier
        is full or down; a failing process-local cache tier (memory) among several targets is
        skipped, since another target holds the chunk.
        """
        cls = check_storage_class(storage_class)
        self._check_sealer(sealer)
        if not items:
            return 0
        if sealer is not None:
            items = [(k, sealer.seal(k, b)) for k, b in items]
        self._check_sizes(items)
        placement = self.placement[cls]
        targets = [self.tier(n) for n in self.write_tiers[cls]]
        total = 0
        stored = 0
        cache_error: StoreError | None = None
        for tier in targets:
            try:
                total += await self._store_in(tier, items)
            except (TierUnavailable, StorageFull) as e:
                if not tier.shared and len(targets) > 1:
                    cache_error = cache_error or e  # a cache tier: fine if another tier holds it
                    continue
                if not placement.overflow_to_lower:
                    raise
                total += await self._overflow(tier, items, {t.name for t in targets}, e)
                self.moves.record([k for k, _ in items])  # spilled: billed on a lower tier
            stored += 1
        if not stored and cache_error is not None:
            raise cache_error
        top = self.tiers[0]
        if warm and isinstance(top, MemoryTier) and top not in targets:
            with contextlib.suppress(StoreError):  # a cache: the class's tiers hold the chunks
                await self._store_in(top, items)
        return total

    async def _overflow(
        self,
        failed: Tier,
        items: Sequence[tuple[ChunkKey, Blob]],
        skip: set[str],
        error: StoreError,
    ) -> int:
        """Write to the first lower tier (not already a target) that accepts ``items``."""
        for tier in self.tiers[self._index[failed.name] + 1 :]:
            if tier.name in skip:
                continue
            try:
                return await self._store_in(tier, items)
            except (TierUnavailable, StorageFull) as e:
                error = e
        raise error

    async def _store_in(self, tier: Tier, items: Sequence[tuple[ChunkKey, Blob]]) -> int:
        """Put ``items`` into one tier, making room through the policy if it is bounded."""
        for _, blob in items:
            tier.check_blob_size(len(blob))
        if tier.capacity is None:
            return await self._call(tier, "put", tier.put_many(items))
        async with self._lock(tier):
            unique: dict[ChunkKey, Blob] = {}
            for k, b in items:
                unique.setdefault(k, b)
            keys = list(unique)
            sizes = await self._call(tier, "sizes", tier.sizes_many(keys))
            need = sum(len(unique[k]) for k, s in zip(keys, sizes, strict=True) if s is None)
            over = await tier.bytes_used() + need - tier.capacity
            if need and over > 0:
                await self._make_room(tier, over, protect=set(keys))
            # every item goes to the tier, which skips what it holds: for a shared directory it
            # checks the files themselves (another process may have deleted a listed chunk)
            try:
                added = await self._call(tier, "put", tier.put_many(list(unique.items())))
            except StorageFull as e:
                # the filesystem (or another process sharing the directory) is fuller than
                # this process's budget says: free room for the whole batch, then retry once
                m.FULL_RETRIES.labels(tier.name).inc()
                try:
                    await self._make_room(tier, max(need, 1), protect=set(keys))
                except StorageFull as none:
                    raise StorageFull(
                        tier.name, f"{none.message} (the write failed first: {e.message})"
                    ) from e
                try:
                    added = await self._call(tier, "put", tier.put_many(list(unique.items())))
                except StorageFull as again:
                    raise StorageFull(
                        tier.name,
                        f"tier {tier.name!r} is full: {again.message} (after freeing "
                        f"{max(need, 1)} bytes of unreferenced or demotable chunks; first "
                        f"error: {e.message})",
                    ) from again
            for k, b in unique.items():
                self.policy.on_store(tier.name, k, len(b))
            m.BYTES_USED.labels(tier.name).set(await tier.bytes_used())
            return added

    async def _make_room(self, tier: Tier, need: int, protect: set[ChunkKey]) -> None:
        """Free at least ``need`` bytes of ``tier`` (caller holds the tier's lock)."""
        skip: set[ChunkKey] = set(protect)
        lower = self.tiers[self._index[tier.name] + 1 :]
        freed = 0
        while freed < need:
            victims = self.policy.victims(tier.name, need - freed, skip)
            if not victims:
                raise StorageFull(
                    tier.name,
                    f"tier {tier.name!r} is full: cannot free {need} bytes without losing the "
                    "last copy of referenced chunks",
                )
            skip.update(victims)
            sizes = await self._call(tier, "sizes", tier.sizes_many(victims))
            gone = [v for v, s in zip(victims, sizes, strict=True) if s is None]
            self.policy.on_remove_many(tier.name, gone)  # stale entries (deleted elsewhere)
            live = {v: s for v, s in zip(victims, sizes, strict=True) if s is not None}
            if not live:
                continue
            try:
                counts = await self.refs.ref_counts(list(live))
            except StoreError:  # unknown: treat every victim as referenced (safe)
                counts = [RefCounts(hot=1)] * len(live)
            drop = [k for k, c in zip(live, counts, strict=True) if c.total == 0]
            keep = [k for k, c in zip(live, counts, strict=True) if c.total > 0]
            if keep and lower:
                below = await self._present_in(lower, keep)
                drop += [k for k, b in zip(keep, below, strict=True) if b]
                drop += await self._demote(
                    tier, [k for k, b in zip(keep, below, strict=True) if not b], lower
                )
            if drop:
                await self._call(tier, "delete", tier.delete_many(drop))
                self.policy.on_remove_many(tier.name, drop)
                m.EVICTIONS.labels(tier.name).inc(len(drop))
                freed += sum(live[k] for k in drop)

    async def _present_in(self, tiers: Iterable[Tier], keys: Sequence[ChunkKey]) -> list[bool]:
        found = [False] * len(keys)
        for tier in tiers:
            pending = [i for i, f in enumerate(found) if not f]
            if not pending:
                break
            try:
                res = await self._call(tier, "exists", tier.exists_many([keys[i] for i in pending]))
            except StoreError:
                continue
            for i, hit in zip(pending, res, strict=True):
                found[i] = found[i] or hit
        return found

    async def _demote(
        self, tier: Tier, keys: Sequence[ChunkKey], lower: Sequence[Tier]
    ) -> list[ChunkKey]:
        """Copy ``keys`` from ``tier`` to the first lower tier that accepts them; return the
        keys that now have a copy below (those that failed stay where they are)."""
        if not keys:
            return []
        blobs = await self._call(tier, "get", tier.get_many(keys))
        items = [(k, b) for k, b in zip(keys, blobs, strict=True) if b is not None]
        missing = [k for k, b in zip(keys, blobs, strict=True) if b is None]
        for target in lower:
            try:
                await self._store_in(target, items)
            except StoreError:
                continue
            m.DEMOTIONS.labels(tier.name).inc(len(items))
            if tier.shared:
                self.moves.record([k for k, _ in items])
            await self._requeue([k for k, _ in items])
            return [k for k, _ in items] + missing
        return missing

    # -- manifests ---------------------------------------------------------------------------
    async def put_manifest(self, manifest: Manifest) -> None:
        """Store ``manifest`` and take its chunk references (idempotent for the same manifest;
        :class:`~kvaas.store.errors.ManifestConflict` for a different one).

        If a collector is deleting some of its chunks right now, wait until it is done (at most
        ``tombstone_wait_s``, then :class:`StoreError`; the manifest stays stored and the call
        can be retried); afterwards treat those chunks as absent and write them.
        """
        stoned = await self.refs.put_manifest(manifest)
        if not stoned:
            return
        deadline = time.monotonic() + self.tombstone_wait_s
        delay = 0.005
        while stoned:
            if time.monotonic() >= deadline:
                raise StoreError(
                    f"cache {manifest.cache_id!r} version {manifest.version}: {len(stoned)} of "
                    f"its chunks are still being garbage-collected after "
                    f"{self.tombstone_wait_s:.0f}s; retry"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
            flags = await self.refs.tombstoned(stoned)
            stoned = [k for k, f in zip(stoned, flags, strict=True) if f]

    async def get_manifest(self, slot: str, cache_id: str, version: int) -> Manifest | None:
        """The stored manifest, or ``None``."""
        return await self.refs.get_manifest(slot, cache_id, version)

    async def list_versions(self, slot: str, cache_id: str) -> list[int]:
        """Stored versions of ``cache_id``, ascending."""
        return await self.refs.list_versions(slot, cache_id)

    async def delete_manifest(self, slot: str, cache_id: str, version: int) -> Manifest | None:
        """Remove the manifest and release its references (chunks that become unreferenced are
        deleted by a later :meth:`collect_garbage`); return it, or ``None`` if absent."""
        return await self.refs.delete_manifest(slot, cache_id, version)

    async def set_storage_class(
        self, slot: str, cache_id: str, version: int, storage_class: str
    ) -> Manifest:
        """Move a cache version to ``storage_class``: references first, then the chunks are
        copied into the new class's tiers and removed from shared tiers no remaining class
        needs. Idempotent (a retry after a failure finishes the move). Raises
        :class:`~kvaas.store.errors.ManifestNotFound`, and tier errors of the copy."""
        cls = check_storage_class(storage_class)
        before = await self.refs.get_manifest(slot, cache_id, version)
        manifest, counts = await self.refs.set_storage_class(slot, cache_id, version, cls)
        old_cls = before.storage_class if before is not None else cls
        targets = [self.tier(n) for n in self.write_tiers[cls]]
        leave = set(self.write_tiers[old_cls]) | self._idle_target(old_cls)
        keys = manifest.chunk_keys
        for start in range(0, len(keys), MOVE_BATCH):
            batch = keys[start : start + MOVE_BATCH]
            blobs, _, _ = await self._fetch(batch)  # copied as stored (sealed)
            items = [(k, b) for k, b in zip(batch, blobs, strict=True) if b is not None]
            if not items:
                continue
            for tier in targets:
                await self._store_in(tier, items)
            self.moves.record([k for k, _ in items])
            await self._requeue([k for k, _ in items])
            batch_counts = counts[start : start + MOVE_BATCH]
            per_tier: dict[str, list[ChunkKey]] = {}
            for (k, b), c in zip(zip(batch, blobs, strict=True), batch_counts, strict=True):
                if b is None:
                    continue
                keep = {n for c2 in c.classes() for n in self.write_tiers[c2]}
                keep |= {n for c2 in c.classes() for n in self._idle_target(c2)}
                for name in leave - keep:
                    if name in self._index and self.tier(name).shared:
                        per_tier.setdefault(name, []).append(k)
            for name, gone in per_tier.items():
                tier = self.tier(name)
                await self._call(tier, "delete", tier.delete_many(gone))
                if tier.capacity is not None:
                    self.policy.on_remove_many(name, gone)
                m.DEMOTIONS.labels(name).inc(len(gone))
        return manifest

    def _idle_target(self, cls: StorageClass) -> set[str]:
        target = self.placement[cls].idle_demote_to
        return {target} if target is not None and target in self._index else set()

    async def lost_chunks(self, manifest: Manifest) -> ChunkPresence:
        """Which of ``manifest``'s chunks are gone from every tier (``.lost``: some are, and
        every tier answered; see :func:`kvaas.store.presence.lost_chunks`). A cache whose
        manifest reports ``lost`` can never be loaded whole again."""
        return await lost_chunks(self, manifest)

    async def bytes_by_tier(self, keys: Iterable[ChunkKey]) -> dict[str, int]:
        """Bytes of the distinct ``keys`` per billed tier (the highest shared tier holding each;
        see :func:`kvaas.store.presence.bytes_by_tier`)."""
        return await bytes_by_tier(self, keys)

    # -- maintenance -------------------------------------------------------------------------
    async def collect_garbage(
        self, *, grace_s: float = 0.0, limit: int = 1000, lease_s: float = 60.0
    ) -> GCResult:
        """Delete up to ``limit`` chunks unreferenced for at least ``grace_s`` from every tier.

        Safe while writers run (see :mod:`kvaas.store.refs`): only claimed chunks are deleted,
        and only while the claim's lease lasts. The claim is finished only once every tier is
        clean; otherwise (a tier cannot be cleaned, the lease ran out, an error, a cancellation)
        it is abandoned in a ``finally`` and the chunks stay candidates for a later pass. Even a
        collector killed outright orphans nothing: candidates leave the index only on finish.
        """
        claim = await self.refs.claim_garbage(grace_s=grace_s, limit=limit, lease_s=lease_s)
        result = GCResult(claimed=len(claim.keys))
        if not claim.keys:
            return result
        keys = list(claim.keys)
        finished = False
        try:
            complete = True
            for tier in self.tiers:
                if claim.expired:
                    result.lease_expired = True
                    complete = False
                    break
                try:
                    n = await self._call(tier, "delete", tier.delete_many(keys))
                except StoreError:
                    result.skipped_tiers.append(tier.name)
                    complete = False
                    continue
                result.deleted_per_tier[tier.name] = n
                if tier.capacity is not None:
                    self.policy.on_remove_many(tier.name, keys)
            if complete:
                await self.refs.finish_claim(claim)
                finished = True
                m.GC_DELETED.inc(len(keys))
        finally:
            if not finished:  # else the tombstones expire with the lease
                with contextlib.suppress(StoreError):
                    await asyncio.shield(self.refs.abandon_claim(claim))
        return result

    async def demote_idle(self, idle_s: float) -> int:
        """Move referenced chunks idle for ``idle_s`` seconds out of the tiers of classes with
        ``idle_demote_to`` (``standard``: Redis → disk), unless another class referencing them
        pins them there (``hot``). Return the number of chunks moved. Unreferenced chunks are
        left to :meth:`collect_garbage`. Needs tiers that report idle times (Redis)."""
        moved = 0
        done: set[str] = set()
        for cls, placement in self.placement.items():
            target = placement.idle_demote_to
            if target is None or target not in self._index:
                continue
            dest = self.tier(target)
            for name in self.write_tiers[cls]:
                src = self.tier(name)
                idle_chunks = getattr(src, "idle_chunks", None)
                if name == target or name in done or idle_chunks is None:
                    continue
                done.add(name)
                keys: list[ChunkKey] = await idle_chunks(idle_s)
                for start in range(0, len(keys), MOVE_BATCH):
                    moved += await self._demote_batch(src, dest, keys[start : start + MOVE_BATCH])
        return moved

    def _pins(self, cls: StorageClass, tier_name: str) -> bool:
        return self.placement[cls].idle_demote_to is None and tier_name in self.write_tiers[cls]

    async def _demote_batch(self, src: Tier, dest: Tier, keys: Sequence[ChunkKey]) -> int:
        counts = await self.refs.ref_counts(keys)
        movable = [
            k
            for k, c in zip(keys, counts, strict=True)
            if c.total > 0 and not any(self._pins(cls, src.name) for cls in c.classes())
        ]
        if not movable:
            return 0
        blobs = await self._call(src, "get", src.get_many(movable))
        items: list[tuple[ChunkKey, Blob]] = []
        corrupt: list[ChunkKey] = []
        for k, b in zip(movable, blobs, strict=True):
            if b is None:
                continue
            try:
                self._verify(k, b, None)
            except ForeignSeal:
                continue  # another key's chunk: left where it is
            except (SealError, CodecError):
                corrupt.append(k)
                continue
            items.append((k, b))
        if corrupt:
            m.CORRUPT_READS.labels(src.name).inc(len(corrupt))
            await self._discard(src, corrupt)
        if not items:
            return 0
        await self._store_in(dest, items)
        done = [k for k, _ in items]
        await self._requeue(done)
        await self._call(src, "delete", src.delete_many(done))
        if src.capacity is not None:
            self.policy.on_remove_many(src.name, done)
        m.DEMOTIONS.labels(src.name).inc(len(done))
        self.moves.record(done)
        return len(done)

    async def rescan_shared(self) -> int:
        """Let bounded tiers shared with other processes (the disk) recount what the shared
        directory holds (see :meth:`~kvaas.store.disk.DiskTier.rescan`), and the eviction policy
        follow; returns the number of chunks adopted or forgotten."""
        changed = 0
        for tier in self.tiers:
            rescan = getattr(tier, "rescan", None)
            if rescan is None or tier.capacity is None:
                continue
            async with self._lock(tier):
                adopted, gone = await rescan()
                self.policy.load(tier.name, adopted)
                self.policy.on_remove_many(tier.name, gone)
            m.BYTES_USED.labels(tier.name).set(await tier.bytes_used())
            changed += len(adopted) + len(gone)
        return changed

    async def usage(self) -> dict[str, int]:
        """Bytes held per tier (tiers that cannot answer right now are left out)."""
        out: dict[str, int] = {}
        for tier in self.tiers:
            try:
                out[tier.name] = await self._call(tier, "usage", tier.bytes_used())
            except StoreError:
                continue
            m.BYTES_USED.labels(tier.name).set(out[tier.name])
        return out

    async def health(self) -> dict[str, TierHealth]:
        """Each tier's health and the index's (under ``refs.name``, ``index``). A down Redis
        shows ``down`` here while reads keep serving from the other tiers."""
        out: dict[str, TierHealth] = {}
        for tier in self.tiers:
            try:
                h = await tier.health()
            except StoreError as e:
                h = TierHealth("down", e.message)
            out[tier.name] = h
            m.TIER_UP.labels(tier.name).set(1 if h.status == "ok" else 0)
        try:
            out[self.refs.name] = await self.refs.health()
        except StoreError as e:
            out[self.refs.name] = TierHealth("down", e.message)
        return out
