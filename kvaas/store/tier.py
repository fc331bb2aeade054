"""The interface every storage tier implements.

A tier maps :data:`~kvaas.store.keys.ChunkKey` → blob bytes. Contracts shared by all tiers:

- Batched calls (``*_many``) answer in one round trip to the backing service (or one thread hop
  for files) and return results in the order of the keys given.
- ``get_many`` returns ``None`` for absent keys; it does **not** verify blobs (the tiered store
  does, with the codec's checksum).
- ``put_many`` is idempotent: keys are content addressed, so a key already present is left as
  it is and not counted again. It enforces the tier's byte budget as a hard limit: a blob bigger
  than the whole budget raises :class:`~kvaas.store.errors.BlobTooLarge`; a batch that does not
  fit in the room left raises :class:`~kvaas.store.errors.StorageFull` (making room is the tiered
  store's job, through its eviction policy).
- A tier whose backing service is unreachable raises
  :class:`~kvaas.store.errors.TierUnavailable` quickly and reports ``down`` in ``health()``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from kvaas.store.errors import BlobTooLarge, ConfigurationError
from kvaas.store.keys import ChunkKey

Blob = bytes | memoryview
"""What tiers store and return: an encoded, checksummed KV chunk."""


@dataclass(frozen=True, slots=True)
class TierHealth:
    """A tier's readiness, as ``/readyz`` reports it."""

    status: Literal["ok", "down"]
    detail: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"status": self.status, "detail": self.detail}


class Tier(ABC):
    """An async key → blob store with a byte budget (``capacity``; ``None`` = unbounded)."""

    name: str
    capacity: int | None
    shared: bool
    """True when other processes see the same data (Redis, a disk directory)."""

    def __init__(self, name: str, capacity: int | None, *, shared: bool) -> None:
        if capacity is not None and capacity <= 0:
            raise ConfigurationError(f"tier {name!r}: capacity must be positive, got {capacity}")
        self.name = name
        self.capacity = capacity
        self.shared = shared

    def check_blob_size(self, size: int) -> None:
        """Raise :class:`BlobTooLarge` if a blob of ``size`` bytes can never fit this tier."""
        if self.capacity is not None and size > self.capacity:
            raise BlobTooLarge(
                f"a {size}-byte chunk exceeds the {self.capacity}-byte budget of tier {self.name!r}"
            )

    async def open(self) -> list[tuple[ChunkKey, int]]:
        """Prepare the tier; return the chunks it already holds as ``(key, size)``, oldest
        first (tiers that cannot list cheaply return ``[]``)."""
        return []

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections or handles. The tier is unusable afterwards."""

    @abstractmethod
    async def get_many(self, keys: Sequence[ChunkKey]) -> list[Blob | None]: ...

    @abstractmethod
    async def put_many(self, items: Sequence[tuple[ChunkKey, Blob]]) -> int:
        """Store the blobs; return the number of bytes newly stored (present keys count 0)."""

    @abstractmethod
    async def exists_many(self, keys: Sequence[ChunkKey]) -> list[bool]: ...

    @abstractmethod
    async def sizes_many(self, keys: Sequence[ChunkKey]) -> list[int | None]:
        """Stored size of each blob, ``None`` where absent."""

    @abstractmethod
    async def delete_many(self, keys: Sequence[ChunkKey]) -> int:
        """Delete the keys; return how many existed. Absent keys are not an error."""

    @abstractmethod
    async def bytes_used(self) -> int: ...

    @abstractmethod
    async def health(self) -> TierHealth: ...

    async def get(self, key: ChunkKey) -> Blob | None:
        return (await self.get_many([key]))[0]

    async def put(self, key: ChunkKey, blob: Blob) -> int:
        return await self.put_many([(key, blob)])

    async def exists(self, key: ChunkKey) -> bool:
        return (await self.exists_many([key]))[0]

    async def delete(self, key: ChunkKey) -> bool:
        return await self.delete_many([key]) > 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, capacity={self.capacity})"
