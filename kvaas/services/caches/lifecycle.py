"""A cache's life after its creation: PATCH (name, metadata, lifetime, storage class),
delete, version delete, tags, and the sweep that expires caches and fails lost prefills.

Transitions committed here: :meth:`LifecycleOps._set_fields`,
:meth:`LifecycleOps._set_storage_class`, :meth:`LifecycleOps._delete` and
:meth:`LifecycleOps._delete_version` (expiry and failure are the core's).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, exists, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.db.base import utcnow
from kvaas.db.models import Cache, CacheTag, CacheVersion, Tenant
from kvaas.db.upsert import upsert
from kvaas.errors import Conflict, NotFound, ServiceUnavailable, ValidationFailed
from kvaas.metering import hooks as metering
from kvaas.services import listing, outbox
from kvaas.services.caches.core import CacheCore, _rows
from kvaas.services.caches.identity import bytes_to_tokens
from kvaas.services.caches.records import (
    NOT_FOUND,
    PURGED,
    STALE_PENDING,
    STALE_REASON,
    TAG_NOT_FOUND,
    UNSET,
    CachePatch,
)
from kvaas.store.errors import StoreError


class LifecycleOps(CacheCore):
    """Update, delete, versions, tags and the sweep."""

    async def update(
        self, session: AsyncSession, tenant: Tenant, cache_id: str, patch: CachePatch
    ) -> Cache:
        """Apply a PATCH: name, metadata, lifetime (``ttl_seconds`` or ``expires_at``),
        ``refresh_on_hit`` and ``storage_class`` (moving the stored chunks)."""
        cache = await self.get_live(session, tenant, cache_id)
        fields: dict[str, Any] = {}
        if patch.name is not UNSET:
            fields["name"] = patch.name
        if patch.metadata is not UNSET:
            fields["meta"] = dict(patch.metadata)
        if patch.refresh_on_hit is not UNSET:
            fields["refresh_on_hit"] = bool(patch.refresh_on_hit)
        if patch.ttl_seconds is not UNSET and patch.expires_at is not UNSET:
            raise ValidationFailed(
                "give `ttl_seconds` or `expires_at`, not both", param="expires_at"
            )
        now = utcnow()
        if patch.ttl_seconds is not UNSET:
            ttl = self._ttl(patch.ttl_seconds)
            fields.update(ttl_seconds=int(ttl.total_seconds()), expires_at=now + ttl)
        elif patch.expires_at is not UNSET:
            at: datetime = patch.expires_at
            ttl = self._ttl(round((at - now).total_seconds()), "expires_at")
            fields.update(ttl_seconds=int(ttl.total_seconds()), expires_at=at)
        if patch.storage_class is not UNSET and patch.storage_class != cache.storage_class:
            await self._set_storage_class(session, tenant, cache, patch.storage_class)
        if fields:
            await self._set_fields(session, cache, fields)
        return cache

    async def _set_fields(
        self, session: AsyncSession, cache: Cache, fields: dict[str, Any]
    ) -> None:
        """Transition: name, metadata, lifetime or ``refresh_on_hit`` changed. Conditional: a
        cache deleted or expired meanwhile is not written (404); a new lifetime is not given to
        a cache already past its old one."""
        now = utcnow()
        res = await session.execute(
            update(Cache)
            .where(
                Cache.id == cache.id,
                Cache.status.in_(("pending", "ready", "failed")),
                Cache.expires_at > now,
            )
            .values(**fields, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        await session.commit()
        await session.refresh(cache)
        if not _rows(res):
            raise NotFound(NOT_FOUND.format(id=cache.id), param="cache_id")

    async def _set_storage_class(
        self, session: AsyncSession, tenant: Tenant, cache: Cache, storage_class: str
    ) -> None:
        """Transition: every live version's chunks moved to ``storage_class`` in the store,
        then the cache row says so."""
        if cache.status != "ready":
            raise Conflict(
                f"cache {cache.id!r} is {cache.status}: only a ready cache changes its storage "
                "class",
                param="storage_class",
            )
        if await self._pending_version(session, cache.id) is not None:
            raise Conflict(
                f"cache {cache.id!r} is being extended; change its storage class afterwards",
                param="storage_class",
            )
        tag = self._slot(tenant)
        try:
            for v in await self._ready_versions(session, cache.id):
                await self.store.set_storage_class(tag, cache.id, v.version, storage_class)
        except StoreError as e:
            raise ServiceUnavailable(f"the cache could not be moved: {e.public_message}") from e
        old = cache.storage_class
        now = utcnow()
        # conditional: still ready, still in the class it was moved from, no extend begun
        res = await session.execute(
            update(Cache)
            .where(
                Cache.id == cache.id,
                Cache.status == "ready",
                Cache.storage_class == old,
                ~exists().where(
                    CacheVersion.cache_id == cache.id, CacheVersion.status == "pending"
                ),
            )
            .values(storage_class=storage_class, updated_at=now)
        )
        if not _rows(res):
            await session.commit()
            await session.refresh(cache)
            if cache.status in ("deleted", "expired"):
                raise NotFound(NOT_FOUND.format(id=cache.id), param="cache_id")
            raise Conflict(
                f"cache {cache.id!r} changed while it was being moved (it is {cache.status}, "
                f"class {cache.storage_class}); retry",
                param="storage_class",
            )
        await session.refresh(cache)
        await metering.on_storage_class_changed(session, cache, old, storage_class, now)
        await session.commit()

    async def delete(self, session: AsyncSession, tenant: Tenant, cache_id: str) -> Cache:
        """Delete the cache: ``deleted``, its tags gone, every version's manifest released."""
        cache = await self.get_live(session, tenant, cache_id)
        await self._delete(session, tenant, cache)
        return cache

    async def _delete(self, session: AsyncSession, tenant: Tenant, cache: Cache) -> None:
        """Transition: the cache is deleted, conditionally (404 when it was deleted or expired
        meanwhile). The release of every stored version, a pending one's included, is in the
        outbox with the status change (a prefill still running also releases its own version
        when it finds out)."""
        rows = await self._retire(session, tenant, cache, "deleted", utcnow())
        await session.commit()
        if rows is None:
            raise NotFound(NOT_FOUND.format(id=cache.id), param="cache_id")
        await self._settle(session, rows)

    async def delete_version(
        self, session: AsyncSession, tenant: Tenant, cache_id: str, version: int
    ) -> tuple[Cache, CacheVersion]:
        """Delete one version; the cache keeps its other versions (409 for the last ready one
        and for a version still being created). Returns the cache and the deleted version."""
        cache = await self.get_live(session, tenant, cache_id)
        row = await self._version(session, cache, version)
        if row.status == "pending":
            raise Conflict(f"version {version} is still being created", param="version")
        ready = await self._ready_versions(session, cache.id)
        rest = [v for v in ready if v.version != version]
        if row.status == "ready" and not rest:
            raise Conflict(
                f"version {version} is the only version of cache {cache_id!r}; delete the cache "
                "instead",
                param="version",
            )
        await session.commit()  # nothing is held while the store is asked
        stored = await self._unique_bytes(self._namespace(tenant), cache, rest) if rest else 0
        await self._delete_version(session, tenant, cache, row, rest, stored)
        return cache, row

    async def _delete_version(
        self,
        session: AsyncSession,
        tenant: Tenant,
        cache: Cache,
        row: CacheVersion,
        rest: Sequence[CacheVersion],
        stored: int,
    ) -> None:
        """Transition: one version deleted; the latest remaining ready version becomes the
        cache's, and its stored bytes (``stored``, measured for ``rest``) count the remaining
        versions' chunks. When the cache's size changes, its storage is metered at the new
        size from now on (a ``resized`` lifecycle event).

        Conditional: the cache row is taken first (``UPDATE ... WHERE status = 'ready'``; 404
        when it is gone), then the version (``WHERE status IN ('ready', 'failed')``; 404 when
        deleted meanwhile). The cache's fields come from the ready versions read under that
        lock; if they are no longer ``rest`` (an extend completed, another version was
        deleted), the bytes are measured again under the lock (rare)."""
        now = utcnow()
        taken = await session.execute(
            update(Cache)
            .where(Cache.id == cache.id, Cache.status == "ready")
            .values(updated_at=now)
        )
        if not _rows(taken):
            await session.commit()
            raise NotFound(NOT_FOUND.format(id=cache.id), param="cache_id")
        gone = await session.execute(
            update(CacheVersion)
            .where(
                CacheVersion.cache_id == cache.id,
                CacheVersion.version == row.version,
                CacheVersion.status.in_(("ready", "failed")),
            )
            .values(status="deleted", deleted_at=now, token_ids=PURGED)
        )
        now_rest = await self._ready_versions(session, cache.id) if _rows(gone) else []
        if not now_rest:
            await session.rollback()
            if _rows(gone):
                raise Conflict(
                    f"version {row.version} is the only version of cache {cache.id!r}; delete "
                    "the cache instead",
                    param="version",
                )
            raise NotFound(f"cache {cache.id!r} has no version {row.version}", param="version")
        if [v.version for v in now_rest] != [v.version for v in rest]:
            stored = await self._unique_bytes(self._namespace(tenant), cache, now_rest)
        await session.refresh(cache)
        await session.refresh(row)
        before = (cache.tokens, cache.stored_bytes)
        latest = now_rest[-1]
        cache.version = latest.version
        cache.tokens = latest.tokens
        cache.token_ids = latest.token_ids
        cache.prefix_sha256 = latest.prefix_sha256
        cache.stored_chunks = latest.chunks
        cache.stored_bytes = stored
        if (cache.tokens, cache.stored_bytes) != before:
            await metering.on_version_deleted(session, cache, row.version, now)
        rows = outbox.queue_release(
            session, self._slot(tenant), cache.id, [row.version], "version_deleted"
        )
        await session.commit()
        await self._settle(session, rows)

    async def put_tag(
        self, session: AsyncSession, tenant: Tenant, name: str, cache_id: str
    ) -> CacheTag:
        """Point the tenant's tag ``name`` at ``cache_id`` (created, or re-pointed atomically)."""
        cache = await self.get_live(session, tenant, cache_id)
        if cache.status == "failed":
            raise Conflict(f"cache {cache_id!r} failed; it cannot be tagged", param="cache_id")
        now = utcnow()
        await upsert(
            session,
            CacheTag,
            {
                "tenant_id": tenant.id,
                "name": name,
                "cache_id": cache.id,
                "created_at": now,
                "updated_at": now,
            },
            ["tenant_id", "name"],
            {"cache_id": cache.id, "updated_at": now},
        )
        await session.commit()
        row = await session.get(CacheTag, (tenant.id, name), populate_existing=True)
        assert row is not None
        return row

    async def get_tag(self, session: AsyncSession, tenant: Tenant, name: str) -> CacheTag:
        row = await listing.get_tag(session, tenant.id, name)
        if row is None:
            raise NotFound(TAG_NOT_FOUND.format(name=name), param="tag")
        return row

    async def delete_tag(self, session: AsyncSession, tenant: Tenant, name: str) -> None:
        res = await session.execute(
            delete(CacheTag).where(CacheTag.tenant_id == tenant.id, CacheTag.name == name)
        )
        if not res.rowcount:  # type: ignore[attr-defined]
            raise NotFound(TAG_NOT_FOUND.format(name=name), param="tag")
        await session.commit()

    async def sweep(self, session: AsyncSession, limit: int = 500) -> int:
        """Expire caches past ``expires_at`` (their releases go through the outbox), and fail
        prefills that lost their gateway: a pending version past its lease (or, without one,
        pending for :data:`STALE_PENDING`) that this process is not running. Every transition
        is conditional, so a cache deleted or extended meanwhile is left as it is. Returns
        how many caches were expired."""
        now = utcnow()
        rows = (
            await session.execute(
                select(Cache, Tenant)
                .join(Tenant, Tenant.id == Cache.tenant_id)
                .where(Cache.status.in_(("ready", "pending")), Cache.expires_at <= now)
                .limit(limit)
            )
        ).all()
        expired = 0
        for cache, tenant in rows:
            expired += await self._expire(session, tenant, cache)
        stale = (
            await session.execute(
                select(CacheVersion, Cache, Tenant)
                .join(Cache, Cache.id == CacheVersion.cache_id)
                .join(Tenant, Tenant.id == Cache.tenant_id)
                .where(
                    CacheVersion.status == "pending",
                    or_(
                        CacheVersion.lease_expires_at < now,
                        CacheVersion.lease_expires_at.is_(None)
                        & (CacheVersion.created_at <= now - STALE_PENDING),
                    ),
                )
                .limit(limit)
            )
        ).all()
        await session.commit()
        for v, cache, tenant in stale:
            if (cache.id, v.version) in self._jobs or (cache.id, v.version) in self._running:
                continue
            job = self._job(tenant, cache, v.version, bytes_to_tokens(v.token_ids))
            # what it may have written
            job.keys = self._cache_keys(tenant, cache, job.ids, v.chunks)
            await self._fail(session, job, STALE_REASON)
        return expired
