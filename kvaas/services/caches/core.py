"""The core every cache operation stands on: identity in the tenant's namespace, lookups of
live caches and versions, and the transitions shared by several operations (fail a prefill,
retire a cache, release its manifests).

:class:`CacheCore` holds the service's collaborators (settings, database, store, engine and
its prompt policy) and the background prefill jobs; the operation classes of this package
extend it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.auth.tenancy import namespace_secret
from kvaas.codec.sizing import chunk_size, read_kv_shape
from kvaas.config import Settings
from kvaas.connector.params import TransferPlan
from kvaas.db.base import utcnow
from kvaas.db.models import Cache, CacheTag, CacheVersion, StoreRelease, Tenant
from kvaas.db.repositories import AuditRepository
from kvaas.db.session import Database
from kvaas.engine import Engine, EngineError, Sampling
from kvaas.errors import APIError, BadRequest, Conflict, NotFound, ValidationFailed
from kvaas.metering import hooks as metering
from kvaas.services import listing, outbox, quotas
from kvaas.services.caches.identity import PrefillJob, bytes_to_tokens, engine_salt, keys_for
from kvaas.services.caches.records import NOT_FOUND, PURGED, TAG_NOT_FOUND, Progress
from kvaas.services.fairness import FairGate
from kvaas.services.prompts import PromptPolicy
from kvaas.store.crypto import MasterKeys, TenantKeys
from kvaas.store.errors import StoreError
from kvaas.store.keys import ChunkKey, derive_namespace, namespace_slot, shard_keys
from kvaas.store.tiered import TieredStore

log = logging.getLogger("kvaas.caches")


def describe_failure(error: BaseException | str) -> tuple[str, str | None]:
    """What a tenant and what an operator read of a failed prefill: ``(public reason,
    internal detail)``. The public reason names the component that failed ("the engine
    failed", "the store is unavailable", ...), never an address, path or lower-level error
    text; those are in the detail (``None`` for a reason given as text)."""
    if isinstance(error, str):
        return error, None
    if isinstance(error, APIError):
        text = error.public_message.rstrip(".")
        public = text[:1].lower() + text[1:]
        detail = "; ".join(p for p in (error.message, error.detail) if p)
    elif isinstance(error, EngineError):
        public = f"the engine failed: {error}"
        detail = error.detail or str(error)
    else:
        public = "internal error"
        detail = f"{type(error).__name__}: {error}"
    return public, detail


class CacheCore:
    """Collaborators, identity, lookups and the shared transitions."""

    def __init__(
        self,
        settings: Settings,
        store: TieredStore,
        engine: Engine | None,
        db: Database,
        gate: FairGate | None = None,
    ) -> None:
        self.settings = settings
        #: admission of every engine request (one per gateway process; else from ``settings``)
        self.gate = gate or FairGate.from_settings(settings)
        self.settling: set[asyncio.Task[None]] = set()  # usage recordings under way
        self.db = db
        self.store = store
        self.engine = engine
        self.prompts = PromptPolicy(engine)
        self._jobs: dict[tuple[str, int], asyncio.Task[None]] = {}
        #: versions this process is prefilling right now (background or not), with a count
        self._running: dict[tuple[str, int], int] = {}
        self._quota_guard = quotas.Guard()
        self._master_keys: MasterKeys | None = None  # loaded (or generated) on first use

    def _engine(self) -> Engine:
        """The running engine (``503 engine_unavailable`` without one)."""
        return self.prompts.engine

    def _require_current(self, cache: Cache) -> None:
        """409 unless ``cache`` is ``ready`` and was made by the model served now."""
        if cache.status != "ready":
            raise Conflict(f"cache {cache.id!r} is {cache.status}, not ready", param="cache_id")
        if cache.model_fingerprint != self._engine().model.fingerprint:
            raise Conflict(
                f"cache {cache.id!r} was made by another model version than the one served now",
                param="cache_id",
            )

    @property
    def master_keys(self) -> MasterKeys:
        """The master keys (loaded, or generated under the data directory, on first use)."""
        if self._master_keys is None:
            self._master_keys = MasterKeys.from_settings(self.settings)
        return self._master_keys

    def _namespace(self, tenant: Tenant) -> bytes:
        return derive_namespace(namespace_secret(tenant, self.master_keys))

    def _keys(self, tenant: Tenant, ids: Sequence[int], scheme: str) -> list[ChunkKey]:
        """Chunk keys of ``ids`` for a new cache: the served model, the configured chunk size."""
        return keys_for(
            self._namespace(tenant),
            ids,
            scheme,
            self._engine().model.fingerprint,
            self.settings.chunk_tokens,
        )

    def _cache_keys(
        self, tenant: Tenant | bytes, cache: Cache, ids: Sequence[int], chunks: int | None
    ) -> list[ChunkKey]:
        """Chunk keys of ``ids`` under an existing cache's model, codec and chunk size, as a
        version of ``chunks`` chunks stores them (``None``: a new version; see
        :func:`~kvaas.services.caches.identity.keys_for`)."""
        ns = tenant if isinstance(tenant, bytes) else self._namespace(tenant)
        return keys_for(ns, ids, cache.scheme, cache.model_fingerprint, cache.chunk_tokens, chunks)

    @property
    def _world(self) -> tuple[int, int]:
        """The engine's tensor- and pipeline-parallel sizes (one rule for every store key)."""
        s = self.settings
        return s.engine_tensor_parallel_size, s.engine_pipeline_parallel_size

    @property
    def _shards(self) -> int:
        """Pieces each chunk is stored as: one per rank of the engine."""
        return self._world[0] * self._world[1]

    def _stored(self, keys: Sequence[ChunkKey]) -> list[ChunkKey]:
        """The keys the store holds the chunks ``keys`` under: every rank's piece of each,
        chunk major (``keys`` themselves with a world of one)."""
        return shard_keys(keys, *self._world)

    def _tenant_keys(self, tenant: Tenant) -> TenantKeys:
        """The tenant's chunk encryption keys, derived from the master keys, for its plans."""
        return self.master_keys.tenant_keys(self._namespace(tenant))

    def _load_plan(
        self, tenant: Tenant, cache: Cache, keys: Sequence[ChunkKey], tail: int = 0
    ) -> TransferPlan:
        """The plan that loads ``keys`` of ``cache`` (the last a partial chunk of ``tail``
        tokens when above 0), with the tenant's keys to open them."""
        return TransferPlan(
            "load",
            tuple(keys),
            cache.chunk_tokens,
            cache.scheme,
            fingerprint=cache.model_fingerprint,
            seal=self._tenant_keys(tenant),
            tail=tail,
        )

    def salted(self, tenant: Tenant, sampling: Sampling) -> Sampling:
        """``sampling`` with the tenant's salt: the engine's own prefix cache never lets one
        tenant reuse (or time) another tenant's KV."""
        return dataclasses.replace(sampling, cache_salt=engine_salt(self._namespace(tenant)))

    def _slot(self, tenant: Tenant) -> str:
        return namespace_slot(self._namespace(tenant))

    def slot_of(self, tenant: Tenant) -> str:
        """The store slot the tenant's manifests are filed under."""
        return self._slot(tenant)

    def _ttl(self, ttl: int | None, param: str = "ttl_seconds") -> timedelta:
        """A lifetime within the configured bounds (``param``: the field it came from)."""
        s = self.settings
        ttl = s.default_ttl_seconds if ttl is None else ttl
        if not s.min_ttl_seconds <= ttl <= s.max_ttl_seconds:
            raise BadRequest(
                f"{param} must give a lifetime in [{s.min_ttl_seconds}, {s.max_ttl_seconds}] "
                f"seconds, got {ttl}",
                param=param,
            )
        return timedelta(seconds=ttl)

    def _reserve_bytes(self, scheme: str, chunk_tokens: int, tokens: int, stored: int = 0) -> int:
        """Bytes reserved against the quota for the chunks a new version of ``tokens`` tokens
        writes after its first ``stored`` full chunks (its parent's, stored already): the most
        they can take, its partial last chunk at its own size (0 when the model's KV shape
        cannot be read)."""
        try:
            shape = read_kv_shape(self._engine().model.path, self.settings.engine_dtype)
        except (OSError, ValueError, KeyError, TypeError):
            return 0
        full, tail = divmod(tokens, chunk_tokens)
        last = chunk_size(shape, tail, scheme).bound if tail else 0
        return (full - stored) * chunk_size(shape, chunk_tokens, scheme).bound + last

    async def get_live(self, session: AsyncSession, tenant: Tenant, cache_id: str) -> Cache:
        """The tenant's cache ``cache_id`` if it is not deleted or expired; 404 otherwise."""
        cache = await session.get(Cache, cache_id)
        if cache is None or cache.tenant_id != tenant.id or cache.status in ("deleted", "expired"):
            raise NotFound(NOT_FOUND.format(id=cache_id), param="cache_id")
        if cache.expires_at <= utcnow():
            if await self._expire(session, tenant, cache) or cache.status not in (
                "pending",
                "ready",
                "failed",
            ):
                raise NotFound(NOT_FOUND.format(id=cache_id), param="cache_id")
            await session.refresh(cache)  # given a later expiry meanwhile
            if cache.status in ("deleted", "expired") or cache.expires_at <= utcnow():
                raise NotFound(NOT_FOUND.format(id=cache_id), param="cache_id")
        return cache

    async def resolve(
        self,
        session: AsyncSession,
        tenant: Tenant,
        *,
        cache_id: str | None = None,
        tag: str | None = None,
    ) -> Cache:
        """The live cache named by exactly one of ``cache_id`` or ``tag``; 404 otherwise."""
        if (cache_id is None) == (tag is None):
            raise ValidationFailed("give exactly one of `cache_id` or `tag`", param="cache_id")
        if cache_id is not None:
            return await self.get_live(session, tenant, cache_id)
        assert tag is not None
        row = await session.get(CacheTag, (tenant.id, tag))
        if row is None:
            raise NotFound(TAG_NOT_FOUND.format(name=tag), param="tag")
        try:
            return await self.get_live(session, tenant, row.cache_id)
        except NotFound:
            raise NotFound(TAG_NOT_FOUND.format(name=tag), param="tag") from None

    async def versions(
        self, session: AsyncSession, tenant: Tenant, cache_id: str
    ) -> tuple[Cache, Sequence[CacheVersion]]:
        """The cache and all its versions (every status), oldest first."""
        cache = await self.get_live(session, tenant, cache_id)
        rows = (
            await session.execute(
                select(CacheVersion)
                .where(CacheVersion.cache_id == cache.id)
                .order_by(CacheVersion.version)
            )
        ).scalars()
        return cache, rows.all()

    async def _version(self, session: AsyncSession, cache: Cache, version: int) -> CacheVersion:
        row = await session.get(CacheVersion, (cache.id, version))
        if row is None or row.status == "deleted":
            raise NotFound(f"cache {cache.id!r} has no version {version}", param="version")
        return row

    async def _pending_version(self, session: AsyncSession, cache_id: str) -> int | None:
        """The version of the cache being created right now, if any."""
        return (
            await session.execute(
                select(CacheVersion.version).where(
                    CacheVersion.cache_id == cache_id, CacheVersion.status == "pending"
                )
            )
        ).scalar()

    async def _ready_versions(self, session: AsyncSession, cache_id: str) -> list[CacheVersion]:
        rows = await session.execute(
            select(CacheVersion)
            .where(CacheVersion.cache_id == cache_id, CacheVersion.status == "ready")
            .order_by(CacheVersion.version)
        )
        return list(rows.scalars())

    async def list_caches(
        self, session: AsyncSession, tenant: Tenant, f: listing.CacheFilter
    ) -> listing.Page:
        return await listing.list_caches(session, tenant.id, f)

    async def tags_of(self, session: AsyncSession, caches: Sequence[Cache]) -> dict[str, list[str]]:
        return await listing.tags_of(session, [c.id for c in caches])

    async def progress(self, tenant: Tenant, caches: Sequence[Cache]) -> dict[str, Progress]:
        """Prefill progress of ``pending`` (from how many leading chunks the store holds, one
        batched lookup for all of them) and ``ready`` caches."""
        out: dict[str, Progress] = {}
        pending: list[tuple[Cache, list[ChunkKey]]] = []
        for c in caches:
            if c.status == "ready":
                out[c.id] = Progress(c.tokens, c.tokens)
            elif c.status == "pending":
                ids = bytes_to_tokens(c.token_ids)
                pending.append((c, self._cache_keys(tenant, c, ids, None)))
        if pending:
            per = self._shards
            try:
                found = await self.store.exists_many(
                    self._stored([k for _, ks in pending for k in ks])
                )
            except StoreError:
                found = [False] * (per * sum(len(ks) for _, ks in pending))
            i = 0
            for c, ks in pending:
                mine = found[i : i + per * len(ks)]
                i += per * len(ks)
                whole = [all(mine[j * per : (j + 1) * per]) for j in range(len(ks))]
                n = next((j for j, f in enumerate(whole) if not f), len(whole))
                out[c.id] = Progress(min(n * c.chunk_tokens, c.tokens), c.tokens)
        return out

    def _job(
        self,
        tenant: Tenant,
        cache: Cache,
        version: int,
        ids: list[int],
        keys: list[ChunkKey] | None = None,
        skip: int = 0,
    ) -> PrefillJob:
        return PrefillJob(
            namespace=self._namespace(tenant),
            cache_id=cache.id,
            version=version,
            ids=ids,
            keys=keys if keys is not None else [],
            skip=skip,
            chunk_tokens=cache.chunk_tokens,
            scheme=cache.scheme,
            storage_class=cache.storage_class,
            fingerprint=cache.model_fingerprint,
            seal=self._tenant_keys(tenant),
            world=self._world,
        )

    async def _unique_bytes(
        self, namespace: bytes, cache: Cache, versions: Sequence[CacheVersion]
    ) -> int:
        """Bytes of the chunks of ``versions``, each chunk counted once."""
        keys: dict[ChunkKey, None] = {}
        for v in versions:
            keys.update(
                dict.fromkeys(
                    self._cache_keys(namespace, cache, bytes_to_tokens(v.token_ids), v.chunks)
                )
            )
        if not keys:
            return 0
        try:
            return sum(n or 0 for n in await self.store.sizes_many(self._stored(list(keys))))
        except StoreError:
            return max((v.stored_bytes for v in versions), default=0)

    async def _fail(
        self, session: AsyncSession, job: PrefillJob, error: BaseException | str
    ) -> str:
        """Transition: the prefill of ``job.version`` failed. A failed create fails the cache;
        a failed extend leaves the cache at its previous version. The version's release
        (its manifest, and the chunks the prefill wrote) is recorded in the same transaction
        and carried out after the commit (or by the outbox's drain).

        Conditional: only a version still ``pending`` becomes ``failed`` (and only a cache
        still ``pending`` fails with its version 1); one deleted meanwhile stays deleted.

        ``error``: a reason meant for the tenant, or the exception that failed the prefill.
        The tenant's ``failure_reason`` is :func:`describe_failure`'s public text; what the
        exception says of the platform's internals goes to the log and to the admin API's
        audit log (action ``cache.prefill_failed``). Returns the public text."""
        reason, detail = describe_failure(error)
        # the cache row first, as every transition takes it (then its versions): no deadlock
        await session.execute(
            update(Cache).where(Cache.id == job.cache_id).values(updated_at=Cache.updated_at)
        )
        failed = await session.execute(
            update(CacheVersion)
            .where(
                CacheVersion.cache_id == job.cache_id,
                CacheVersion.version == job.version,
                CacheVersion.status == "pending",
            )
            .values(status="failed", failure_reason=reason, token_ids=PURGED, lease_expires_at=None)
        )
        if _rows(failed):
            if job.version == 1:
                await session.execute(
                    update(Cache)
                    .where(Cache.id == job.cache_id, Cache.status == "pending")
                    .values(status="failed", failure_reason=reason, token_ids=PURGED)
                )
            await session.execute(
                update(Cache)
                .where(Cache.id == job.cache_id)
                .values(reserved_tokens=0, reserved_bytes=0)
            )
        rows = outbox.queue_release(
            session, job.slot, job.cache_id, [job.version], "failed", job.stored_keys
        )
        if detail is not None:
            log.warning("prefill of %s v%d failed: %s", job.cache_id, job.version, detail)
            tenant_id = (
                await session.execute(select(Cache.tenant_id).where(Cache.id == job.cache_id))
            ).scalar()
            await AuditRepository(session).record(
                actor="kvaas",
                action="cache.prefill_failed",
                target_type="cache",
                target_id=job.cache_id,
                tenant_id=tenant_id,
                details={"version": job.version, "reason": reason, "detail": detail[:2000]},
            )
        await session.commit()
        await self._settle(session, rows)
        return reason

    async def _settle(self, session: AsyncSession, rows: Sequence[StoreRelease]) -> None:
        """Carry out releases just committed to the outbox (``rows``), now, best effort: each
        one the store confirms leaves the outbox; on a store error the rest stay for the
        outbox's drain (with its back-off)."""
        done: list[int] = []
        try:
            for row in rows:
                await outbox.release_now(self.store, row)
                done.append(row.id)
        except StoreError as e:
            log.info("release of %s deferred to the outbox: %s", rows[0].cache_id, e)
        finally:
            if done:
                with contextlib.suppress(Exception):  # a later drain releases them again
                    await session.execute(delete(StoreRelease).where(StoreRelease.id.in_(done)))
                    await session.commit()

    async def _expire(self, session: AsyncSession, tenant: Tenant, cache: Cache) -> bool:
        """Transition: the cache passed ``expires_at``. Conditional: a cache deleted, or given
        a later ``expires_at``, meanwhile is left alone (``False``)."""
        now = utcnow()
        rows = await self._retire(session, tenant, cache, "expired", now)
        if rows is None:
            await session.commit()
            return False
        await session.commit()
        await self._settle(session, rows)
        return True

    async def _lost(self, session: AsyncSession, tenant: Tenant, cache: Cache) -> bool:
        """Whether the chunks of the cache's current version are gone from every tier (a Redis
        restart that lost recent writes, a disk replaced): the store holds no manifest for it,
        or some chunk is in no tier while every tier answered. A tier that cannot answer never
        makes a cache lost."""
        try:
            manifest = await self.store.get_manifest(self._slot(tenant), cache.id, cache.version)
            if manifest is None:
                return True
            return (await self.store.lost_chunks(manifest)).lost
        except StoreError:
            return False

    async def _mark_lost(self, session: AsyncSession, tenant: Tenant, cache: Cache) -> bool:
        """Transition: the cache's stored KV is lost (:meth:`_lost`). It becomes ``failed``
        with :data:`LOST_REASON`, its storage stops being billed now (the ``ended`` event,
        once), and what the tiers still hold of it is released through the outbox.
        Conditional: only a cache still ``ready`` at that version (``False`` otherwise)."""
        now = utcnow()
        res = await session.execute(
            update(Cache)
            .where(Cache.id == cache.id, Cache.status == "ready", Cache.version == cache.version)
            .values(
                status="failed",
                failure_reason=LOST_REASON,
                reserved_tokens=0,
                reserved_bytes=0,
                updated_at=now,
            )
        )
        if not _rows(res):
            await session.commit()
            return False
        await session.refresh(cache)
        await session.execute(
            update(CacheVersion)
            .where(CacheVersion.cache_id == cache.id, CacheVersion.status == "ready")
            .values(status="failed", failure_reason=LOST_REASON)
        )
        await metering.on_cache_ended(session, cache, "lost", now)
        rows = outbox.queue_release(session, self._slot(tenant), cache.id, None, "lost")
        log.warning("cache %s: its stored chunks are gone from every tier; marked failed", cache.id)
        await session.commit()
        await self._settle(session, rows)
        return True

    async def _retire(
        self, session: AsyncSession, tenant: Tenant, cache: Cache, status: str, now: datetime
    ) -> list[StoreRelease] | None:
        """The database side of deletion and expiry (the caller commits), conditional on the
        cache being live (for an expiry: and past ``expires_at``): ``None`` when it is not
        (nothing written). The prompt's token ids are purged from the cache and its versions;
        counts and hashes stay for billing and audit. The release of every stored version
        (a pending one's included) is recorded in the outbox; returns those rows."""
        cond: ColumnElement[bool] = Cache.status.in_(
            ("pending", "ready", "failed") if status == "deleted" else ("pending", "ready")
        )
        if status == "expired":
            cond = and_(cond, Cache.expires_at <= now)
        values: dict[str, object] = dict(
            status=status, token_ids=PURGED, reserved_tokens=0, reserved_bytes=0, updated_at=now
        )
        if status == "deleted":
            values["deleted_at"] = now
        res = await session.execute(
            update(Cache).where(Cache.id == cache.id, cond).values(**values)
        )
        if not _rows(res):
            return None
        await session.refresh(cache)
        await session.execute(
            update(CacheVersion)
            .where(CacheVersion.cache_id == cache.id, CacheVersion.status != "deleted")
            .values(status="deleted", deleted_at=now, token_ids=PURGED, lease_expires_at=None)
        )
        await session.execute(delete(CacheTag).where(CacheTag.cache_id == cache.id))
        # storage is metered until the deletion, or until ``expires_at`` for an expiry
        await metering.on_cache_ended(session, cache, status, now if status == "deleted" else None)
        return outbox.queue_release(session, self._slot(tenant), cache.id, None, status)


#: ``failure_reason`` of a cache whose stored KV was lost from every tier.
LOST_REASON = "its stored KV was lost from every storage tier (evicted); create it again"


def _rows(result: object) -> int:
    """Rows an ``UPDATE``/``DELETE`` matched."""
    return int(getattr(result, "rowcount", 0) or 0)
