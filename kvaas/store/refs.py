"""Reference counts, manifests and the garbage-collection protocol.

A :class:`RefIndex` stores manifests and, per chunk, how many stored manifests of each storage
class reference it. Two implementations: :class:`~kvaas.store.refs_redis.RedisRefIndex` (Lua
scripts; used whenever the store has a Redis tier, so every engine node shares it) and
:class:`~kvaas.store.refs_sqlite.SqliteRefIndex` (a SQLite file next to the disk tier, for the
embedded mode; safe across processes through SQLite's locking).

Collection protocol (no chunk of a stored manifest is ever deleted):

1. *Writers take references first.* ``put_manifest`` atomically stores the manifest and
   increments the count of each of its chunks, **before** the writer checks which chunks exist
   and writes the missing ones. It returns the chunks that a collector is deleting right now
   (they carry a *tombstone*); the writer waits until those tombstones are gone (the tiered
   store does this) and then treats the chunks as absent.
2. *Releasing* (``delete_manifest``) decrements the counts; a chunk whose counts all reach
   zero is recorded as a GC candidate with the time it became unreferenced.
3. *Collectors claim in one atomic step.* ``claim_garbage`` re-checks, per chunk and atomically
   with writers (one Lua script / one SQLite write transaction), that the chunk is still a
   candidate, unreferenced and unreferenced for at least ``grace_s``, and sets a tombstone
   (owned by the claim's token, expiring after ``lease_s``). The candidate **stays** recorded
   while the claim lasts: only claimed chunks are deleted from the tiers, only while the lease
   lasts, and a collector that dies or is cancelled before it finishes leaves its chunks as
   candidates, which a later pass claims once the lease is over. Claiming is idempotent per
   token: run twice (redis-py sends a script again after a socket timeout), a claim answers
   the chunks it already holds; a chunk tombstoned by another live claim is skipped.
4. ``finish_claim`` removes the collector's tombstones once the tier deletes are done, and with
   them the candidates (those it still owned, not referenced, and not released again after the
   claim); ``abandon_claim`` (called in a ``finally``, cancellation included) only removes the
   tombstones, so the chunks are retried by a later pass without waiting for the lease.

A writer that references a chunk after the claim sees the tombstone and waits, so its own write
of that chunk lands after the collector's delete; a writer that referenced it before the claim
makes the claim skip it.

5. *Copies made without a reference* (demotion on eviction, promotion, idle demotion, class
   changes) can land after a collector deleted the chunk; the copier therefore calls
   ``requeue_unreferenced`` after writing, which records every chunk that is unreferenced at that
   moment as a candidate again, so such a copy is collected later instead of leaking.
"""

from __future__ import annotations

import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from kvaas.store.keys import ChunkKey
from kvaas.store.manifest import Manifest
from kvaas.store.policy import StorageClass
from kvaas.store.tier import TierHealth


class RefCounts(NamedTuple):
    """How many stored manifests of each storage class reference one chunk."""

    hot: int = 0
    standard: int = 0
    cold: int = 0

    @property
    def total(self) -> int:
        return self.hot + self.standard + self.cold

    def classes(self) -> tuple[StorageClass, ...]:
        out: list[StorageClass] = []
        if self.hot:
            out.append("hot")
        if self.standard:
            out.append("standard")
        if self.cold:
            out.append("cold")
        return tuple(out)


@dataclass(frozen=True, slots=True)
class GarbageClaim:
    """Chunks a collector may delete, until ``deadline`` (``time.monotonic()``).

    ``claimed_at`` is the index's clock when the claim was made (server time for Redis): a
    candidate released again after it is left in place by ``finish_claim``."""

    token: str
    keys: tuple[ChunkKey, ...]
    deadline: float
    claimed_at: float = 0.0

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.deadline


@dataclass(slots=True)
class GCResult:
    """What one :meth:`~kvaas.store.tiered.TieredStore.collect_garbage` pass did."""

    claimed: int = 0
    deleted_per_tier: dict[str, int] = field(default_factory=dict)
    skipped_tiers: list[str] = field(default_factory=list)
    lease_expired: bool = False


def new_claim_token() -> str:
    return secrets.token_hex(12)


class RefIndex(ABC):
    """Manifests and chunk reference counts (see the module docstring for the protocol)."""

    name: str = "refs"

    @abstractmethod
    async def put_manifest(self, manifest: Manifest) -> list[ChunkKey]:
        """Store ``manifest`` and take one reference per chunk, atomically.

        Idempotent for an identical manifest (no second reference). Raises
        :class:`~kvaas.store.errors.ManifestConflict` if a different one is stored under the same
        ``(namespace_slot, cache_id, version)``. Returns the chunks currently being collected.
        """

    @abstractmethod
    async def get_manifest(self, slot: str, cache_id: str, version: int) -> Manifest | None: ...

    @abstractmethod
    async def list_versions(self, slot: str, cache_id: str) -> list[int]:
        """Versions of ``cache_id`` that have a stored manifest, ascending."""

    @abstractmethod
    async def delete_manifest(self, slot: str, cache_id: str, version: int) -> Manifest | None:
        """Remove the manifest and release its references, atomically; return it (``None`` if
        it was not stored: deleting twice releases once)."""

    @abstractmethod
    async def set_storage_class(
        self, slot: str, cache_id: str, version: int, storage_class: StorageClass
    ) -> tuple[Manifest, list[RefCounts]]:
        """Move the manifest's references to ``storage_class``; return the updated manifest and
        each chunk's counts afterwards. Raises ``ManifestNotFound``."""

    @abstractmethod
    async def ref_counts(self, keys: Sequence[ChunkKey]) -> list[RefCounts]: ...

    @abstractmethod
    async def tombstoned(self, keys: Sequence[ChunkKey]) -> list[bool]: ...

    @abstractmethod
    async def claim_garbage(
        self, *, grace_s: float, limit: int, lease_s: float, token: str | None = None
    ) -> GarbageClaim:
        """Claim up to ``limit`` candidates unreferenced for ``grace_s`` seconds, for
        ``lease_s`` seconds, under ``token`` (default: a new one). Idempotent per token."""

    @abstractmethod
    async def finish_claim(self, claim: GarbageClaim) -> None:
        """Remove the claim's tombstones (those still owned by its token)."""

    @abstractmethod
    async def abandon_claim(self, claim: GarbageClaim) -> None:
        """Give the claim up: remove its tombstones; the chunks that are still unreferenced
        stay (or become again) candidates, keeping the time they became unreferenced."""

    @abstractmethod
    async def requeue_unreferenced(self, keys: Sequence[ChunkKey]) -> int:
        """Record the ``keys`` that no manifest references right now as GC candidates
        (unreferenced since now, unless already candidates); return how many were added."""

    @abstractmethod
    async def health(self) -> TierHealth: ...

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Check the backing service before use (raise ``ConfigurationError`` when it cannot
        hold the index safely)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
