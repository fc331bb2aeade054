"""The Redis tier: chunks as Redis strings, shared by every engine node.

Works against a standalone Redis or a Redis Cluster (``RedisConnection(cluster=True)``). Chunk
keys are hash-tagged with the tenant's namespace slot, so a prefix's chunks live in one slot; a
batch is one pipeline (one round trip; per node in a cluster), holding one command per slot where
Redis has a multi-key form (``MGET``; a small Lua script for existence), since the Python
client's per-command cost dominates a 128-key prefix lookup otherwise.

Writes use ``SET NX`` (content addressed: an existing chunk is kept) together with an
``INCRBY`` of the slot's byte counter in the same pipeline; a chunk that turned out to exist
already is subtracted again in a rare second round trip. ``ttl_s`` sets an idle expiry: writes
set it and reads refresh it (``GETEX``). Chunks that expire by TTL are not subtracted from the
counters until :meth:`RedisTier.recount` runs, so ``bytes_used`` can over-count under TTL.

The tier has no byte budget of its own: Redis' ``maxmemory`` (with ``noeviction``, which the
reference index requires) is the budget, and an OOM reply surfaces as
:class:`~kvaas.store.errors.StorageFull` (a ``standard`` write then spills to disk). Deletes
still work at ``maxmemory``, so garbage collection frees a full Redis.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from kvaas.store.errors import StorageFull, StoreError, TierUnavailable
from kvaas.store.keys import ChunkKey
from kvaas.store.redis_conn import RedisConnection, RedisKeys, chunked, group_by_slot
from kvaas.store.tier import Blob, Tier, TierHealth

_EXISTS_SCRIPT = """
local out = {}
for i, k in ipairs(KEYS) do out[i] = redis.call('EXISTS', k) end
return out
"""


class RedisTier(Tier):
    """Chunks in Redis (standalone or Cluster) through a shared :class:`RedisConnection`."""

    def __init__(
        self,
        conn: RedisConnection,
        *,
        ttl_s: float | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name or conn.name, None, shared=True)
        self.conn = conn
        self.keys: RedisKeys = conn.keys
        self.ttl_ms = None if ttl_s is None else max(1, int(ttl_s * 1000))

    async def get_many(self, keys: Sequence[ChunkKey]) -> list[Blob | None]:
        """One round trip: an ``MGET`` per slot (or a ``GETEX`` per key under TTL, which
        refreshes the expiry) in one pipeline."""
        if not keys:
            return []
        ttl = self.ttl_ms
        nbytes = len(keys) * 4 * 1024 * 1024
        if ttl is not None:
            names = [self.keys.chunk(k) for k in keys]

            def build_ex(pipe: Any) -> None:
                for n in names:
                    pipe.getex(n, px=ttl)

            return await self.conn.pipelined(build_ex, nbytes=nbytes)
        groups = list(group_by_slot(keys).values())

        def build(pipe: Any) -> None:
            for g in groups:  # (redis-py refuses .mget() in cluster pipelines; the raw
                # command is fine: every key of a group hashes to the same slot)
                pipe.execute_command("MGET", *(self.keys.chunk(keys[i]) for i in g))

        out: list[Blob | None] = [None] * len(keys)
        for g, values in zip(groups, await self.conn.pipelined(build, nbytes=nbytes), strict=True):
            for i, v in zip(g, values, strict=True):
                out[i] = v
        return out

    async def put_many(self, items: Sequence[tuple[ChunkKey, Blob]]) -> int:
        if not items:
            return 0
        unique: dict[ChunkKey, Blob] = {}
        for key, blob in items:
            self.check_blob_size(len(blob))
            unique.setdefault(key, blob)
        entries = list(unique.items())
        ttl = self.ttl_ms
        total = sum(len(b) for _, b in entries)

        def build(pipe: Any) -> None:
            for key, blob in entries:
                pipe.set(self.keys.chunk(key), blob, nx=True, px=ttl)
                pipe.incrby(self.keys.counter(key[:4].hex()), len(blob))

        replies = await self.conn.pipelined(build, nbytes=total)
        existed = [entries[i] for i in range(len(entries)) if not replies[2 * i]]
        if existed:  # undo the optimistic counter increments of chunks that were present

            def undo(pipe: Any) -> None:
                for key, blob in existed:
                    pipe.decrby(self.keys.counter(key[:4].hex()), len(blob))

            await self.conn.pipelined(undo)
        return total - sum(len(b) for _, b in existed)

    async def exists_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """One round trip: a small Lua script per slot answers every key of the slot (one
        command instead of one ``EXISTS`` each, which matters for long prefixes)."""
        if not keys:
            return []
        groups = list(group_by_slot(keys).values())

        def build(pipe: Any) -> None:
            for g in groups:
                names = [self.keys.chunk(keys[i]) for i in g]
                pipe.eval(_EXISTS_SCRIPT, len(names), *names)

        out = [False] * len(keys)
        for g, flags in zip(groups, await self.conn.pipelined(build), strict=True):
            for i, f in zip(g, flags, strict=True):
                out[i] = bool(f)
        return out

    async def sizes_many(self, keys: Sequence[ChunkKey]) -> list[int | None]:
        if not keys:
            return []
        names = [self.keys.chunk(k) for k in keys]

        def build(pipe: Any) -> None:
            for n in names:
                pipe.strlen(n)

        return [int(r) or None for r in await self.conn.pipelined(build)]

    async def delete_many(self, keys: Sequence[ChunkKey]) -> int:
        """Delete chunks (and subtract their sizes). Two round trips: sizes, then deletes."""
        if not keys:
            return 0
        unique = list(dict.fromkeys(keys))
        sizes = await self.sizes_many(unique)
        present = [(k, s) for k, s in zip(unique, sizes, strict=True) if s]
        if not present:
            return 0

        def build(pipe: Any) -> None:
            for key, _ in present:
                pipe.delete(self.keys.chunk(key))

        replies = await self.conn.pipelined(build)
        gone = [(k, s) for (k, s), r in zip(present, replies, strict=True) if r]
        if gone:

            def account(pipe: Any) -> None:
                for key, size in gone:
                    pipe.decrby(self.keys.counter(key[:4].hex()), size)

            # at maxmemory Redis refuses even DECRBY: the chunks are gone all the same; the
            # counters over-count until recount()
            with contextlib.suppress(StorageFull):
                await self.conn.pipelined(account)
        return len(gone)

    async def bytes_used(self) -> int:
        """Sum of the per-slot byte counters (a scan of counter keys; not for hot paths)."""
        names = await self.conn.scan_keys(self.keys.counter_pattern())
        total = 0
        for batch in chunked(names, 1000):

            def build(pipe: Any, batch: Sequence[bytes] = batch) -> None:
                for n in batch:
                    pipe.get(n)

            total += sum(int(v or 0) for v in await self.conn.pipelined(build))
        return total

    async def recount(self) -> int:
        """Rebuild the byte counters from the chunks actually stored; return the total."""
        names = await self.conn.scan_keys(self.keys.chunk_pattern())
        per_slot: dict[str, int] = {}
        for batch in chunked(names, 1000):

            def build(pipe: Any, batch: Sequence[bytes] = batch) -> None:
                for n in batch:
                    pipe.strlen(n)

            sizes = await self.conn.pipelined(build)
            for n, size in zip(batch, sizes, strict=True):
                slot = RedisKeys.key_of_chunk_name(n)[:4].hex()
                per_slot[slot] = per_slot.get(slot, 0) + int(size)
        stale = await self.conn.scan_keys(self.keys.counter_pattern())

        def build_set(pipe: Any) -> None:
            for n in stale:
                pipe.delete(n)
            for slot, size in per_slot.items():
                pipe.set(self.keys.counter(slot), size)

        await self.conn.pipelined(build_set)
        return sum(per_slot.values())

    async def idle_chunks(self, idle_s: float, limit: int = 10_000) -> list[ChunkKey]:
        """Chunks not read or written for at least ``idle_s`` seconds (``OBJECT IDLETIME``).

        A maintenance scan over every chunk key; returns ``[]`` when the server's eviction policy
        keeps LFU counters instead of idle times.
        """
        names = await self.conn.scan_keys(self.keys.chunk_pattern())
        out: list[ChunkKey] = []
        for batch in chunked(names, 1000):

            def build(pipe: Any, batch: Sequence[bytes] = batch) -> None:
                for n in batch:
                    pipe.object("idletime", n)

            try:
                idle = await self.conn.pipelined(build)
            except TierUnavailable:
                raise
            except StoreError:  # an LFU eviction policy refuses OBJECT IDLETIME
                return out
            for n, secs in zip(batch, idle, strict=True):
                if secs is not None and int(secs) >= idle_s:
                    out.append(RedisKeys.key_of_chunk_name(n))
                    if len(out) >= limit:
                        return out
        return out

    async def health(self) -> TierHealth:
        return await self.conn.ping()

    async def close(self) -> None:
        await self.conn.close()
