"""The in-process memory tier: a byte-budgeted dict of immutable ``bytes`` objects.

Reads are zero-copy: ``get_many`` returns the very ``bytes`` objects stored (a blob handed in
as ``bytes`` is stored as is; a ``bytearray``/``memoryview`` is copied once, on put, so later
writes by the caller cannot change stored data). Recency and eviction are decided by the
tiered store's policy, not here; this tier only enforces its budget as a hard limit. All methods
run on the event loop without awaiting, so each call is atomic with respect to other tasks;
:meth:`MemoryTier.peek_many` may also be called from other threads.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvaas.store.errors import StorageFull
from kvaas.store.keys import ChunkKey
from kvaas.store.tier import Blob, Tier, TierHealth


class MemoryTier(Tier):
    """Chunks kept in this process's memory, up to ``capacity`` bytes."""

    def __init__(self, capacity: int, *, name: str = "memory") -> None:
        super().__init__(name, capacity, shared=False)
        self._data: dict[ChunkKey, bytes] = {}
        self._used = 0

    async def get_many(self, keys: Sequence[ChunkKey]) -> list[Blob | None]:
        return list(self.peek_many(keys))

    def peek_many(self, keys: Sequence[ChunkKey]) -> list[bytes | None]:
        """What :meth:`get_many` returns, callable from any thread: each lookup is one
        ``dict.get`` (atomic under the GIL), and stored blobs are immutable ``bytes``, so a
        concurrent put or delete on the loop makes a key present or absent, never torn."""
        get = self._data.get
        return [get(k) for k in keys]

    async def put_many(self, items: Sequence[tuple[ChunkKey, Blob]]) -> int:
        new: dict[ChunkKey, Blob] = {}
        for key, blob in items:
            self.check_blob_size(len(blob))
            if key not in self._data:
                new[key] = blob
        added = sum(len(b) for b in new.values())
        assert self.capacity is not None
        if self._used + added > self.capacity:
            raise StorageFull(
                self.name,
                f"memory tier {self.name!r}: {added} more bytes exceed the budget "
                f"({self._used}/{self.capacity} used)",
            )
        for key, blob in new.items():
            self._data[key] = blob if isinstance(blob, bytes) else bytes(blob)
        self._used += added
        return added

    async def exists_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        data = self._data
        return [k in data for k in keys]

    async def sizes_many(self, keys: Sequence[ChunkKey]) -> list[int | None]:
        get = self._data.get
        return [None if (b := get(k)) is None else len(b) for k in keys]

    async def delete_many(self, keys: Sequence[ChunkKey]) -> int:
        n = 0
        for k in keys:
            blob = self._data.pop(k, None)
            if blob is not None:
                self._used -= len(blob)
                n += 1
        return n

    async def bytes_used(self) -> int:
        return self._used

    async def health(self) -> TierHealth:
        assert self.capacity is not None
        return TierHealth("ok", f"{len(self._data)} chunks, {self._used}/{self.capacity} bytes")

    def __len__(self) -> int:
        return len(self._data)
