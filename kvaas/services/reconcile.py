"""The reconciler: manifests the store holds that no live version owns, found and released.

The outbox (:mod:`kvaas.services.outbox`) releases what a transition retired. The reconciler
is the net under it: a release lost to anything else (a crash of a prefill between its
``put_manifest`` and the commit that notices its cache was deleted, a row removed by hand, a
bug) is found by comparing the store with the database:

- for each cache, the versions the store holds a manifest of (``list_versions``, the store's
  public listing) against the versions the database says are live (``ready``, and ``pending``
  while a prefill may still run);
- a stored version that is not live (its cache or version deleted, expired or failed) and has
  no release in the outbox yet is queued there (reason ``orphaned``), so it is released with
  the same retries as any other.

Every manifest is written after its cache row is committed, so this per-cache comparison
covers every manifest whose cache row exists. It is bounded: each call checks at most
``batch`` caches, continuing from a cursor, and wraps around after the last one.
:func:`reconcile_all` runs one full cycle (tests, the CLI, operators).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Counter
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.db.models import Cache, CacheVersion, StoreRelease, Tenant
from kvaas.db.session import Database
from kvaas.errors import APIError
from kvaas.services import outbox
from kvaas.store.tiered import TieredStore

log = logging.getLogger("kvaas.reconcile")

ORPHANS = Counter(
    "kvaas_reconcile_orphans_total",
    "Manifests found in the store with no live version in the database (queued for release).",
)
#: Version statuses whose manifest is owned: kept while ready, written while pending.
OWNED = ("ready", "pending")


@dataclass
class Reconciler:
    """A cursor over the caches, oldest id first, and what the last passes found."""

    cursor: str = ""
    wrapped: bool = False  # the last call reached the end and starts over next time
    found: list[tuple[str, int]] = field(default_factory=list)  # (cache id, version)
    skipped: set[str] = field(default_factory=set)  # tenants whose slot this process lacks

    async def step(
        self,
        db: Database,
        store: TieredStore,
        slot_of: Callable[[Tenant], str],
        *,
        batch: int = 200,
    ) -> int:
        """Check up to ``batch`` caches after the cursor; queue the release of every stored
        version no live version owns. Returns how many were found (0 on a clean store)."""
        async with db.session() as session:
            rows = (
                await session.execute(
                    select(Cache, Tenant)
                    .join(Tenant, Tenant.id == Cache.tenant_id)
                    .where(Cache.id > self.cursor)
                    .order_by(Cache.id)
                    .limit(batch)
                )
            ).all()
            await session.commit()
            self.wrapped = len(rows) < batch
            self.cursor = "" if self.wrapped else rows[-1][0].id
            found = 0
            slots: dict[str, str | None] = {}
            for cache, tenant in rows:
                if tenant.id not in slots:
                    slots[tenant.id] = self._slot(slot_of, tenant)
                slot = slots[tenant.id]
                if slot is not None:
                    found += await self._check(session, store, slot, cache)
            return found

    def _slot(self, slot_of: Callable[[Tenant], str], tenant: Tenant) -> str | None:
        """The tenant's slot; ``None`` (its caches skipped this pass, the others checked) when
        this process cannot resolve it: its namespace secret is wrapped under a master key
        not configured here. One such tenant must not stop reconciliation for every other."""
        try:
            return slot_of(tenant)
        except APIError as e:
            if tenant.id not in self.skipped:
                log.warning("reconcile: tenant %s skipped: %s", tenant.id, e.detail or e.message)
            self.skipped.add(tenant.id)
            return None

    async def _check(
        self, session: AsyncSession, store: TieredStore, slot: str, cache: Cache
    ) -> int:
        stored = await store.list_versions(slot, cache.id)
        if not stored:
            return 0
        live = cache.status in ("pending", "ready")
        owned = set()
        if live:
            owned = set(
                (
                    await session.execute(
                        select(CacheVersion.version).where(
                            CacheVersion.cache_id == cache.id, CacheVersion.status.in_(OWNED)
                        )
                    )
                ).scalars()
            )
        queued = {
            v
            for v in (
                await session.execute(
                    select(StoreRelease.version).where(StoreRelease.cache_id == cache.id)
                )
            ).scalars()
        }
        if None in queued:  # the whole cache's release is owed already
            await session.commit()
            return 0
        orphans = [v for v in stored if v not in owned and v not in queued]
        if orphans:
            outbox.queue_release(session, slot, cache.id, orphans, "orphaned")
            self.found.extend((cache.id, v) for v in orphans)
            ORPHANS.inc(len(orphans))
            log.warning(
                "cache %s: manifests of versions %s have no live version; release queued",
                cache.id,
                orphans,
            )
        await session.commit()
        return len(orphans)


async def reconcile_all(
    db: Database,
    store: TieredStore,
    slot_of: Callable[[Tenant], str],
    *,
    batch: int = 500,
) -> int:
    """One full cycle over every cache; returns the manifests found (queued for release)."""
    r = Reconciler()
    total = 0
    while True:
        total += await r.step(db, store, slot_of, batch=batch)
        if r.wrapped:
            return total
