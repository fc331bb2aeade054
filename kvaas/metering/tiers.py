"""Storage billed per tier follows where the store really keeps a cache's chunks.

The lifecycle hooks record a cache's bytes where its storage class *should* keep them
(:func:`~kvaas.metering.hooks.default_tiers`: ``standard`` and ``hot`` in Redis, ``cold`` on
disk). The store moves chunks on its own: a ``standard`` write spills to disk when Redis is full
or down, idle ``standard`` chunks are demoted to disk, a read promotes them back. Every such move
is journaled by the store (:class:`~kvaas.store.presence.TierMoves`); :class:`TierBilling`
drains the journal each round, measures the affected caches
(:meth:`~kvaas.store.tiered.TieredStore.bytes_by_tier`: each chunk once, in the highest shared
tier holding it) and records a ``tiers_changed`` lifecycle event through
:func:`~kvaas.metering.hooks.on_tiers_changed` wherever the measure differs from what billing
currently charges, from the time of the move on. Caches whose lifecycle changed since the last
round (created, extended, class changed: events that state the default tiers) are measured too,
from the time of their event. So storage is billed per tier from the moment chunks moved, once
(the hook is idempotent), within one round of the move.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.db.models import Cache, CacheLifecycleEvent, Tenant
from kvaas.db.session import Database
from kvaas.metering.hooks import on_tiers_changed
from kvaas.store.errors import StoreError
from kvaas.store.keys import ChunkKey
from kvaas.store.tiered import TieredStore

log = logging.getLogger("kvaas.metering")


def _nonzero(tiers: Mapping[str, int]) -> dict[str, int]:
    return {k: int(v) for k, v in tiers.items() if v}


async def sync_cache_tiers(
    session: AsyncSession, cache: Cache, measured: Mapping[str, int], at: datetime
) -> bool:
    """Record that ``cache`` keeps ``measured`` bytes per tier from ``at`` on (or from its
    latest lifecycle event, if later), unless billing already charges exactly that or the cache
    ended. Adds rows to ``session`` without committing; True if an event was recorded."""
    last = (
        await session.execute(
            select(CacheLifecycleEvent)
            .where(CacheLifecycleEvent.cache_id == cache.id)
            .order_by(CacheLifecycleEvent.at.desc(), CacheLifecycleEvent.id.desc())
            .limit(1)
        )
    ).scalar_one_or_none()
    if last is None or last.kind == "ended":
        return False
    if _nonzero(last.bytes_by_tier or {}) == _nonzero(measured):
        return False
    return await on_tiers_changed(session, cache, _nonzero(measured), max(at, last.at))


class TierBilling:
    """One round of per-tier storage billing at a time (see the module docstring).

    ``slot_of`` gives a tenant's namespace slot (the store's manifests are keyed by it; the
    cache service's ``slot_of``);
    ``batch`` bounds the caches measured per round (the rest wait for the next round).
    """

    def __init__(
        self,
        db: Database,
        store: TieredStore,
        slot_of: Callable[[Tenant], str],
        *,
        batch: int = 500,
    ) -> None:
        self.db = db
        self.store = store
        self.slot_of = slot_of
        self.batch = batch
        self._slot_by_tenant: dict[str, str] = {}
        self._last_event_id: int | None = None
        """The newest lifecycle event seen by the previous round (events after it are new)."""

    async def sync_round(self) -> int:
        """Measure the caches of tenants whose chunks moved, and those with a new lifecycle
        event; record the differences. Returns the number of events recorded."""
        moved, overflowed = self.store.moves.drain()
        try:
            recorded, left = await self._sync(moved, overflowed)
        except BaseException:
            self.store.moves.restore(moved)
            raise
        self.store.moves.restore(left)
        return recorded

    async def _sync(self, moved: dict[str, float], everyone: bool) -> tuple[int, dict[str, float]]:
        """Returns the events recorded and the moved slots left for the next round (batch
        exhausted, or a tier could not answer)."""
        recorded = 0
        async with self.db.session() as s:
            newest = (await s.execute(select(func.max(CacheLifecycleEvent.id)))).scalar() or 0
            changed: set[str] = set()
            if self._last_event_id is not None:  # by primary key: no scan of old events
                changed = set(
                    (
                        await s.execute(
                            select(CacheLifecycleEvent.cache_id).where(
                                CacheLifecycleEvent.id > self._last_event_id,
                                CacheLifecycleEvent.id <= newest,
                                CacheLifecycleEvent.kind != "tiers_changed",
                            )
                        )
                    ).scalars()
                )
            self._last_event_id = newest
            if not (moved or everyone or changed):
                return 0, {}
            slot_by_tenant = await self._slots(s)
            wanted = [t for t, slot in slot_by_tenant.items() if everyone or slot in moved]
            caches: dict[str, Cache] = {}
            for column, values in ((Cache.tenant_id, wanted), (Cache.id, sorted(changed))):
                for i in range(0, len(values), _IN_BATCH):
                    part = values[i : i + _IN_BATCH]
                    rows = await s.execute(
                        select(Cache).where(Cache.status == "ready", column.in_(part))
                    )
                    caches.update((c.id, c) for c in rows.scalars())
            left: dict[str, float] = {}
            done = 0
            for cache in sorted(caches.values(), key=lambda c: (c.tenant_id, c.id)):
                slot = slot_by_tenant.get(cache.tenant_id)
                if not slot:
                    continue
                if done >= self.batch:  # the rest next round
                    if slot in moved:
                        left[slot] = moved[slot]
                    continue
                # a move: from its time; a new event: from the event (the latest one wins)
                at = _when(moved[slot]) if slot in moved else _EPOCH
                try:
                    keys = await self._keys(slot, cache.id)
                    measured = await self.store.bytes_by_tier(keys)
                except StoreError as e:  # a tier cannot answer: measure next round
                    log.info("tier billing: cache %s not measured: %s", cache.id, e)
                    left[slot] = moved.get(slot, time.time())
                    continue
                done += 1
                if await sync_cache_tiers(s, cache, measured, at):
                    recorded += 1
            await s.commit()
        return recorded, left

    async def _slots(self, s: AsyncSession) -> dict[str, str]:
        """Each tenant's namespace slot (cached: a tenant's slot never changes); ``""`` for a
        tenant this gateway cannot resolve (its secret is wrapped under a key it lacks)."""
        for tenant in (await s.execute(select(Tenant))).scalars():
            if tenant.id not in self._slot_by_tenant:
                try:
                    self._slot_by_tenant[tenant.id] = self.slot_of(tenant)
                except Exception as e:
                    log.warning("tier billing: tenant %s skipped: %s", tenant.id, e)
                    self._slot_by_tenant[tenant.id] = ""
        return self._slot_by_tenant

    async def _keys(self, slot: str, cache_id: str) -> Iterable[ChunkKey]:
        keys: dict[ChunkKey, None] = {}
        for v in await self.store.list_versions(slot, cache_id):
            m = await self.store.get_manifest(slot, cache_id, v)
            if m is not None:
                keys.update(dict.fromkeys(m.chunk_keys))
        return list(keys)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_IN_BATCH = 500


def _when(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)
