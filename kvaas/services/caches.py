"""The cache service: create a cache (prefill + store), extend it by versions, attach it, tag
it, and keep its lifecycle.

Create: tokenize, compute the chunk keys in the tenant's namespace, check the tenant's quotas
and insert the cache row and its version 1 (``pending``), then run the prefill: store the
manifest (taking chunk references *before* any chunk is written, so garbage collection can
never delete them), run the engine with a ``save`` plan, check that every chunk reached the
store and mark the cache ``ready`` (or ``failed`` with a reason, releasing its references).
With ``wait=False`` the prefill runs in a background task the service owns (:meth:`drain`
waits for them, then cancels the rest and marks their caches ``failed``).

Extend: version ``n + 1`` holds version ``n``'s tokens followed by new ones. Its chunk keys
chain from the same parents, so its first chunks *are* version ``n``'s: the engine loads them
from the store (``save`` plan with ``skip``), computes only the new tokens and writes only the
new chunks. Each version has its own manifest; versions share chunks through the store's
reference counts, and the cache's ``stored_bytes`` counts each chunk once.

Attach: the version's tokens come first, the request's after them; the engine runs with a
``load`` plan for the chunks the store still holds. The result says whether the cache was hit
and, if not, why: ``too_short`` (the cache is shorter than one chunk), ``evicted`` (chunks are
gone from every tier), ``load_failed`` (a chunk could not be read or verified; the engine
recomputed it). ``require_hit`` turns a miss into ``409 cache_miss``.

A cache that is deleted or past ``expires_at`` is ``404`` for everyone: to its owner and to
any other tenant alike, with the same message.

**Transitions.** Every change of a cache's lifecycle is committed by exactly one method, in one
transaction, so bookkeeping that must follow it (usage metering) belongs inside that method:
:meth:`CacheService._begin_create` / :meth:`_begin_extend` (rows inserted, quota reserved),
:meth:`_complete` (a version became ready: create or extend done), :meth:`_fail`,
:meth:`_record_hit` (attach), :meth:`_set_storage_class`, :meth:`_set_fields`,
:meth:`_delete_version`, :meth:`_delete`, :meth:`_expire`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas import codec
from kvaas.billing.budget import check_create_allowed
from kvaas.config import Settings
from kvaas.connector.params import TransferPlan
from kvaas.db.base import utcnow
from kvaas.db.models import Cache, CacheTag, CacheVersion, Tenant
from kvaas.db.session import Database
from kvaas.engine import Engine, EngineError, Generation, Sampling, kv_dtype
from kvaas.errors import BadRequest, Conflict, NotFound, ServiceUnavailable, ValidationFailed
from kvaas.metering import hooks as metering
from kvaas.metering.ledger import record_usage
from kvaas.services import listing, quotas
from kvaas.store.errors import StoreError
from kvaas.store.keys import ChunkKey, chunk_keys, derive_namespace, namespace_tag
from kvaas.store.manifest import Manifest
from kvaas.store.tiered import TieredStore

log = logging.getLogger("kvaas.caches")


class CacheMiss(Conflict):
    type = "cache_miss"
    description = "The cache could not be attached and require_hit was set."


class EngineUnavailable(ServiceUnavailable):
    type = "engine_unavailable"
    description = "No engine is running to serve this request."


NOT_FOUND = "no cache with id {id!r} (it may have expired or been deleted)"
TAG_NOT_FOUND = "no tag {name!r} (or the cache it pointed at is gone)"
SHUTDOWN_REASON = "the gateway shut down before the prefill finished"
STALE_REASON = "the prefill did not finish (the gateway running it stopped)"
#: A prefill still pending after this long has lost its gateway; the sweep fails it.
STALE_PENDING = timedelta(hours=1)


@dataclass
class Prompt:
    """Request text in one of its three forms (exactly one is set)."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    token_ids: list[int] | None = None


@dataclass
class CreateSpec:
    prompt: Prompt
    name: str | None = None
    ttl_seconds: int | None = None
    storage_class: str | None = None
    compression: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    model: str | None = None
    refresh_on_hit: bool = False


@dataclass
class CreateResult:
    """A created cache (or new version). ``prefill_tokens`` / ``ttft_ms`` are those of the
    prefill; both unset while it still runs in the background."""

    cache: Cache
    prefill_tokens: int | None
    ttft_ms: float | None


UNSET: Any = object()


@dataclass
class CachePatch:
    """Fields a PATCH changes; a field left ``UNSET`` is not touched."""

    name: Any = UNSET
    metadata: Any = UNSET
    ttl_seconds: Any = UNSET
    expires_at: Any = UNSET
    storage_class: Any = UNSET
    refresh_on_hit: Any = UNSET


@dataclass(frozen=True)
class Progress:
    tokens_done: int
    tokens_total: int


@dataclass
class AttachOutcome:
    generation: Generation
    cache: Cache
    prompt_tokens: int
    expected_tokens: int
    available_tokens: int
    version: int = 0

    @property
    def load_failed(self) -> bool:
        return bool(self.generation.connector.get("load_failed"))

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose KV was reused (a failed load's recomputed tokens excluded)."""
        g = self.generation
        if self.load_failed:
            return min(g.cached_tokens, int(g.connector.get("loaded_tokens", 0)))
        return g.cached_tokens

    @property
    def hit(self) -> bool:
        return (
            self.expected_tokens > 0
            and not self.load_failed
            and self.cached_tokens >= self.expected_tokens
        )

    @property
    def miss_reason(self) -> str | None:
        if self.hit:
            return None
        if self.expected_tokens == 0:
            return "too_short"
        if self.available_tokens < self.expected_tokens:
            return "evicted"
        return "load_failed"


@dataclass
class _Prefill:
    """One version to prefill and store: its tokens, keys and where they go. It holds plain
    values only (the tenant's namespace, not its row): a background prefill outlives the
    request's session."""

    namespace: bytes
    cache_id: str
    version: int
    ids: list[int]
    keys: list[ChunkKey]
    skip: int  # leading chunks already stored (the parent version's), loaded not computed
    chunk_tokens: int
    compression: str
    storage_class: str
    fingerprint: str

    @property
    def tag(self) -> str:
        return namespace_tag(self.namespace)

    def manifest(self) -> Manifest:
        return Manifest(
            cache_id=self.cache_id,
            version=self.version,
            namespace_tag=self.tag,
            chunk_keys=tuple(self.keys),
            token_count=len(self.ids),
            chunk_tokens=self.chunk_tokens,
            codec=self.compression,
            model_fingerprint=self.fingerprint,
            storage_class=self.storage_class,  # type: ignore[arg-type]
        )

    def plan(self) -> TransferPlan:
        return TransferPlan(
            "save",
            tuple(self.keys),
            self.chunk_tokens,
            self.compression,
            self.storage_class,
            skip=self.skip,
        )


def tokens_to_bytes(ids: Sequence[int]) -> bytes:
    return np.asarray(ids, dtype="<i4").tobytes()


def bytes_to_tokens(raw: bytes) -> list[int]:
    return np.frombuffer(raw, dtype="<i4").tolist()


def _sha(ids: Sequence[int]) -> str:
    return hashlib.sha256(tokens_to_bytes(ids)).hexdigest()


def _chunk_keys(
    namespace: bytes, ids: Sequence[int], compression: str, fingerprint: str, chunk_tokens: int
) -> list[ChunkKey]:
    return chunk_keys(
        ids,
        namespace=namespace,
        model_fingerprint=fingerprint,
        codec_id=f"{compression}:{codec.scheme_id(compression)}",
        chunk_tokens=chunk_tokens,
    )


class CacheService:
    """Cache operations over the metadata database, the store and the engine."""

    def __init__(
        self, settings: Settings, store: TieredStore, engine: Engine | None, db: Database
    ) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.engine = engine
        self._jobs: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._quota_guard = quotas.Guard()

    # -- helpers ---------------------------------------------------------------------------
    def _engine(self) -> Engine:
        if self.engine is None:
            raise EngineUnavailable("this gateway runs without an engine (KVAAS_ENGINE=none)")
        return self.engine

    def _tokenize(
        self, p: Prompt, *, continuation: bool, generation_prompt: bool | None = None
    ) -> list[int]:
        """Token ids of ``p``. ``continuation``: they follow earlier tokens (no BOS); chat
        messages then end with the assistant's turn unless ``generation_prompt`` is False."""
        eng = self._engine()
        given = [x for x in (p.prompt, p.messages, p.token_ids) if x is not None]
        if len(given) != 1:
            raise BadRequest("give exactly one of `prompt`, `messages` or `token_ids`")
        if p.token_ids is not None:
            vocab = len(eng.model.tokenizer)
            if any(t < 0 or t >= vocab for t in p.token_ids):
                raise BadRequest(f"token ids must lie in [0, {vocab})", param="token_ids")
            return list(p.token_ids)
        if p.messages is not None:
            gen = continuation if generation_prompt is None else generation_prompt
            return eng.model.encode_messages(
                p.messages, add_generation_prompt=gen, continuation=continuation
            )
        assert p.prompt is not None
        return eng.model.encode(p.prompt, add_special_tokens=not continuation)

    def _namespace(self, tenant: Tenant) -> bytes:
        return derive_namespace(bytes.fromhex(tenant.namespace_secret))

    def _keys(self, tenant: Tenant, ids: Sequence[int], compression: str) -> list[ChunkKey]:
        """Chunk keys of ``ids`` for a new cache: the served model, the configured chunk size."""
        return _chunk_keys(
            self._namespace(tenant),
            ids,
            compression,
            self._engine().model.fingerprint,
            self.settings.chunk_tokens,
        )

    def _cache_keys(
        self, tenant: Tenant | bytes, cache: Cache, ids: Sequence[int]
    ) -> list[ChunkKey]:
        """Chunk keys of ``ids`` under an existing cache's model, codec and chunk size."""
        ns = tenant if isinstance(tenant, bytes) else self._namespace(tenant)
        return _chunk_keys(ns, ids, cache.compression, cache.model_fingerprint, cache.chunk_tokens)

    def salted(self, tenant: Tenant, sampling: Sampling) -> Sampling:
        """``sampling`` with the tenant's salt: the engine's own prefix cache never lets one
        tenant reuse (or time) another tenant's KV."""
        return dataclasses.replace(sampling, cache_salt=self._tag(tenant))

    def _tag(self, tenant: Tenant) -> str:
        return namespace_tag(self._namespace(tenant))

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

    def _check_length(self, ids: Sequence[int], param: str) -> None:
        limit = self._engine().max_model_len - 1
        if len(ids) > limit:
            raise BadRequest(
                f"the prompt has {len(ids)} tokens; this model caches at most {limit}",
                param=param,
            )

    def _chunk_bytes(self, compression: str, chunk_tokens: int) -> int:
        eng = self._engine()
        dtype = kv_dtype(eng.model.path, self.settings.engine_dtype)
        return quotas.chunk_bytes(eng.model.path, dtype, compression, chunk_tokens)

    # -- lookup ----------------------------------------------------------------------------
    async def get_live(self, session: AsyncSession, tenant: Tenant, cache_id: str) -> Cache:
        """The tenant's cache ``cache_id`` if it is not deleted or expired; 404 otherwise."""
        cache = await session.get(Cache, cache_id)
        if cache is None or cache.tenant_id != tenant.id or cache.status in ("deleted", "expired"):
            raise NotFound(NOT_FOUND.format(id=cache_id), param="cache_id")
        if cache.expires_at <= utcnow():
            await self._expire(session, tenant, cache)
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
                pending.append((c, self._cache_keys(tenant, c, bytes_to_tokens(c.token_ids))))
        if pending:
            try:
                found = await self.store.exists_many([k for _, ks in pending for k in ks])
            except StoreError:
                found = [False] * sum(len(ks) for _, ks in pending)
            i = 0
            for c, ks in pending:
                mine = found[i : i + len(ks)]
                i += len(ks)
                n = next((j for j, f in enumerate(mine) if not f), len(mine))
                out[c.id] = Progress(min(n * c.chunk_tokens, c.tokens), c.tokens)
        return out

    # -- create ----------------------------------------------------------------------------
    async def create(
        self, session: AsyncSession, tenant: Tenant, spec: CreateSpec, *, wait: bool = True
    ) -> CreateResult:
        """Create a cache. ``wait``: prefill now and answer when it is stored (503 if that
        fails); otherwise answer at once with the ``pending`` cache and prefill in the
        background."""
        eng = self._engine()
        s = self.settings
        if spec.model is not None and spec.model != eng.model.name:
            raise BadRequest(
                f"model {spec.model!r} is not served here; this service runs {eng.model.name!r}",
                param="model",
            )
        ids = self._tokenize(spec.prompt, continuation=False)
        if not ids:
            raise BadRequest("the prompt is empty")
        self._check_length(ids, "prompt")
        ttl = self._ttl(spec.ttl_seconds)
        compression = spec.compression or s.default_compression
        storage_class = spec.storage_class or s.default_storage_class
        keys = self._keys(tenant, ids, compression)
        now = utcnow()
        cache = Cache(
            tenant_id=tenant.id,
            name=spec.name,
            model=eng.model.name,
            model_fingerprint=eng.model.fingerprint,
            status="pending",
            version=1,
            tokens=len(ids),
            token_ids=tokens_to_bytes(ids),
            prefix_sha256=_sha(ids),
            chunk_tokens=s.chunk_tokens,
            compression=compression,
            storage_class=storage_class,
            meta=dict(spec.metadata),
            hit_count=0,
            stored_chunks=0,
            stored_bytes=0,
            reserved_tokens=0,
            reserved_bytes=len(keys) * self._chunk_bytes(compression, s.chunk_tokens),
            ttl_seconds=int(ttl.total_seconds()),
            refresh_on_hit=spec.refresh_on_hit,
            expires_at=now + ttl,
            created_at=now,
        )
        await check_create_allowed(session, tenant, self.settings)
        await self._begin_create(session, tenant, cache)
        job = self._job(tenant, cache, 1, ids, keys)
        if not wait:
            self._spawn(job)
            return CreateResult(cache, None, None)
        gen = await self._prefill(session, job)  # completes `cache` (the same row object)
        return CreateResult(cache, gen.prompt_tokens - gen.cached_tokens, gen.ttft_ms)

    async def _begin_create(self, session: AsyncSession, tenant: Tenant, cache: Cache) -> None:
        """Transition: a new cache and its version 1 exist, ``pending``, their storage
        reserved against the tenant's quotas."""
        async with self._quota_guard(session, tenant) as used:
            quotas.check(
                tenant,
                used,
                new_cache=True,
                tokens=cache.tokens,
                nbytes=cache.reserved_bytes,
                default_max_caches=self.settings.default_max_caches,
            )
            session.add(cache)
            await session.flush()  # the cache row first: the version references it
            session.add(
                CacheVersion(
                    cache_id=cache.id,
                    version=1,
                    status="pending",
                    tokens=cache.tokens,
                    token_ids=cache.token_ids,
                    prefix_sha256=cache.prefix_sha256,
                    chunks=cache.tokens // cache.chunk_tokens,
                    stored_bytes=0,
                    created_at=cache.created_at,
                )
            )
            await session.commit()

    # -- extend ----------------------------------------------------------------------------
    async def extend(
        self, session: AsyncSession, tenant: Tenant, cache_id: str, prompt: Prompt
    ) -> CreateResult:
        """Create version ``n + 1`` = the latest version's tokens + ``prompt``'s. Only the new
        tokens are computed and only the new chunks written."""
        eng = self._engine()
        cache = await self.get_live(session, tenant, cache_id)
        if cache.status != "ready":
            raise Conflict(f"cache {cache_id!r} is {cache.status}, not ready", param="cache_id")
        if cache.model_fingerprint != eng.model.fingerprint:
            raise Conflict(
                f"cache {cache_id!r} was made by another model version than the one served now",
                param="cache_id",
            )
        new = self._tokenize(prompt, continuation=True, generation_prompt=False)
        if not new:
            raise BadRequest("the extension is empty")
        base = bytes_to_tokens(cache.token_ids)
        ids = base + new
        self._check_length(ids, "prompt")
        keys = self._cache_keys(tenant, cache, ids)
        n_base = len(base) // cache.chunk_tokens  # the parent's chunks: the same keys
        try:  # reuse what the store still holds; anything missing is computed and written
            skip = await self.store.longest_prefix(keys[:n_base]) if n_base else 0
        except StoreError:
            skip = 0
        reserve_bytes = (len(keys) - n_base) * self._chunk_bytes(
            cache.compression, cache.chunk_tokens
        )
        version = await self._begin_extend(session, tenant, cache, ids, len(new), reserve_bytes)
        job = self._job(tenant, cache, version, ids, keys, skip)
        gen = await self._prefill(session, job)
        return CreateResult(cache, gen.prompt_tokens - gen.cached_tokens, gen.ttft_ms)

    async def _begin_extend(
        self,
        session: AsyncSession,
        tenant: Tenant,
        cache: Cache,
        ids: list[int],
        new_tokens: int,
        reserve_bytes: int,
    ) -> int:
        """Transition: version ``n + 1`` exists, ``pending``, its new tokens and chunks reserved
        against the tenant's quotas. Returns the version number."""
        async with self._quota_guard(session, tenant) as used:
            pending = await self._pending_version(session, cache.id)
            if pending is not None:
                raise Conflict(
                    f"cache {cache.id!r} is already being extended (version {pending})",
                    param="cache_id",
                )
            quotas.check(
                tenant,
                used,
                new_cache=False,
                tokens=new_tokens,
                nbytes=reserve_bytes,
                default_max_caches=self.settings.default_max_caches,
            )
            last = (
                await session.execute(
                    select(CacheVersion.version)
                    .where(CacheVersion.cache_id == cache.id)
                    .order_by(CacheVersion.version.desc())
                    .limit(1)
                )
            ).scalar_one()
            version = last + 1  # numbers are never reused, even after a version is deleted
            session.add(
                CacheVersion(
                    cache_id=cache.id,
                    version=version,
                    status="pending",
                    tokens=len(ids),
                    token_ids=tokens_to_bytes(ids),
                    prefix_sha256=_sha(ids),
                    chunks=len(ids) // cache.chunk_tokens,
                    stored_bytes=0,
                    created_at=utcnow(),
                )
            )
            cache.reserved_tokens = new_tokens
            cache.reserved_bytes = reserve_bytes
            await session.commit()
        return version

    # -- prefill (create and extend) -------------------------------------------------------
    def _job(
        self,
        tenant: Tenant,
        cache: Cache,
        version: int,
        ids: list[int],
        keys: list[ChunkKey] | None = None,
        skip: int = 0,
    ) -> _Prefill:
        return _Prefill(
            namespace=self._namespace(tenant),
            cache_id=cache.id,
            version=version,
            ids=ids,
            keys=keys if keys is not None else [],
            skip=skip,
            chunk_tokens=cache.chunk_tokens,
            compression=cache.compression,
            storage_class=cache.storage_class,
            fingerprint=cache.model_fingerprint,
        )

    async def _prefill(self, session: AsyncSession, job: _Prefill) -> Generation:
        """Store the manifest, run the engine with a save plan, check the chunks and complete
        the version; on failure mark it failed and raise 503."""
        eng = self._engine()
        try:
            await self.store.put_manifest(job.manifest())
            once = Sampling(max_tokens=1, temperature=0.0, cache_salt=job.tag)
            gen = await eng.generate(job.ids, once, job.plan())
            sizes = await self.store.sizes_many(job.keys)
        except (StoreError, EngineError) as e:
            await self._fail(session, job, str(e))
            raise ServiceUnavailable(f"the cache could not be stored: {e}") from e
        if not all(sizes):
            n = sum(1 for x in sizes if x)
            reason = f"only {n} of {len(job.keys)} chunks reached the store"
            await self._fail(session, job, reason)
            raise ServiceUnavailable(f"the cache could not be stored: {reason}")
        prefilled = max(0, gen.prompt_tokens - gen.cached_tokens)
        await self._complete(session, job, sum(x or 0 for x in sizes), prefilled)
        return gen

    async def _unique_bytes(
        self, namespace: bytes, cache: Cache, versions: Sequence[CacheVersion]
    ) -> int:
        """Bytes of the chunks of ``versions``, each chunk counted once."""
        keys: dict[ChunkKey, None] = {}
        for v in versions:
            keys.update(
                dict.fromkeys(self._cache_keys(namespace, cache, bytes_to_tokens(v.token_ids)))
            )
        if not keys:
            return 0
        try:
            return sum(n or 0 for n in await self.store.sizes_many(list(keys)))
        except StoreError:
            return max((v.stored_bytes for v in versions), default=0)

    async def _complete(
        self, session: AsyncSession, job: _Prefill, stored_bytes: int, prefill_tokens: int
    ) -> None:
        """Transition: version ``job.version`` is stored and ``ready`` (a create when it is
        version 1, else an extend); it becomes the cache's latest version and the reservation
        is replaced by the bytes stored. If the cache or version was deleted (or expired)
        meanwhile, its manifest is released instead (404)."""
        # the cache row is locked (PostgreSQL) until the commit: a concurrent delete either
        # happened before (this version is released here) or sees the version ready
        cache = await session.get(Cache, job.cache_id, populate_existing=True, with_for_update=True)
        row = await session.get(CacheVersion, (job.cache_id, job.version), populate_existing=True)
        if (
            cache is None
            or row is None
            or row.status != "pending"
            or cache.status not in ("pending", "ready")
        ):
            await session.commit()
            await self._release(job.tag, job.cache_id, [job.version], job.keys)
            raise NotFound(NOT_FOUND.format(id=job.cache_id), param="cache_id")
        row.status = "ready"
        row.stored_bytes = stored_bytes
        ready = [*await self._ready_versions(session, cache.id), row]
        cache.stored_bytes = await self._unique_bytes(job.namespace, cache, ready)
        cache.status = "ready"
        cache.version = job.version
        cache.tokens = row.tokens
        cache.token_ids = row.token_ids
        cache.prefix_sha256 = row.prefix_sha256
        cache.stored_chunks = row.chunks
        cache.reserved_tokens = 0
        cache.reserved_bytes = 0
        await self._meter_stored(session, cache, job.version, prefill_tokens)
        await session.commit()

    @staticmethod
    async def _meter_stored(
        session: AsyncSession, cache: Cache, version: int, prefill_tokens: int
    ) -> None:
        """Usage of a completed prefill, in the transaction that completes it: a create
        starts metering storage; an extend resizes it and meters its own prefill."""
        now = utcnow()
        if version == 1:
            await metering.on_create(session, cache, prefill_tokens, None, now)
            await metering.on_cache_ready(session, cache, now)
            return
        await metering.on_cache_extended(session, cache, now)
        if prefill_tokens > 0:
            await record_usage(
                session,
                idempotency_key=f"extend:{cache.id}:v{version}:prefill_tokens",
                tenant_id=cache.tenant_id,
                meter="prefill_tokens",
                quantity=prefill_tokens,
                occurred_at=now,
                cache_id=cache.id,
                details={"op": "extend", "version": version},
            )

    async def _fail(self, session: AsyncSession, job: _Prefill, reason: str) -> None:
        """Transition: the prefill of ``job.version`` failed. A failed create fails the cache;
        a failed extend leaves the cache at its previous version. The version's manifest is
        released first: a version seen ``failed`` holds no chunks."""
        await self._release(job.tag, job.cache_id, [job.version], job.keys)
        cache = await session.get(Cache, job.cache_id, populate_existing=True, with_for_update=True)
        row = await session.get(CacheVersion, (job.cache_id, job.version), populate_existing=True)
        if row is not None and row.status == "pending":
            row.status = "failed"
            row.failure_reason = reason
        if cache is not None:
            if job.version == 1 and cache.status == "pending":
                cache.status = "failed"
                cache.failure_reason = reason
            cache.reserved_tokens = 0
            cache.reserved_bytes = 0
        await session.commit()

    async def _release(
        self,
        tag: str,
        cache_id: str,
        versions: Sequence[int] | None = None,
        written: Sequence[ChunkKey] = (),
    ) -> None:
        """Release the manifests of ``versions`` (default: every stored one) so garbage
        collection can take the chunks no other manifest references. ``written``: chunks a
        prefill may have written after a concurrent release; they are queued for collection
        too."""
        # known gap: on a store outage the manifests (and so their chunks) stay referenced
        with contextlib.suppress(StoreError):
            if versions is None:
                versions = await self.store.list_versions(tag, cache_id)
            for v in versions:
                await self.store.delete_manifest(tag, cache_id, v)
            if written:
                await self.store.refs.requeue_unreferenced(list(written))

    # -- background prefills ---------------------------------------------------------------
    def _spawn(self, job: _Prefill) -> None:
        key = (job.cache_id, job.version)
        task = asyncio.create_task(self._background(job), name=f"prefill {key}")
        self._jobs[key] = task
        task.add_done_callback(lambda _t: self._jobs.pop(key, None))

    async def _background(self, job: _Prefill) -> None:
        try:
            async with self.db.session() as session:
                await self._prefill(session, job)
        except asyncio.CancelledError:
            async with self.db.session() as session:
                await self._fail(session, job, SHUTDOWN_REASON)
            raise
        except (ServiceUnavailable, NotFound) as e:  # marked failed / released already
            log.info("background prefill of %s v%d: %s", job.cache_id, job.version, e.message)
        except Exception as e:
            log.exception("background prefill of %s v%d failed", job.cache_id, job.version)
            with contextlib.suppress(Exception):
                async with self.db.session() as session:
                    await self._fail(session, job, f"internal error: {type(e).__name__}")

    @property
    def running_jobs(self) -> int:
        return len(self._jobs)

    async def drain(self, grace_s: float = 10.0) -> None:
        """Wait up to ``grace_s`` for background prefills, then cancel the rest; each cancelled
        one marks its cache (or version) ``failed`` before it ends."""
        tasks = list(self._jobs.values())
        if not tasks:
            return
        if grace_s > 0:
            _, still = await asyncio.wait(tasks, timeout=grace_s)
        else:
            still = set(tasks)
        for t in still:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- attach ----------------------------------------------------------------------------
    async def _prepare_attach(
        self,
        session: AsyncSession,
        tenant: Tenant,
        cache_id: str | None,
        tag: str | None,
        version: int | None,
        prompt: Prompt,
        sampling: Sampling,
        require_hit: bool,
    ) -> tuple[Cache, int, list[int], TransferPlan | None, int, int]:
        eng = self._engine()
        cache = await self.resolve(session, tenant, cache_id=cache_id, tag=tag)
        cid = cache.id
        if cache.status != "ready":
            raise Conflict(f"cache {cid!r} is {cache.status}, not ready", param="cache_id")
        if cache.model_fingerprint != eng.model.fingerprint:
            raise Conflict(
                f"cache {cid!r} was made by another model version than the one served now",
                param="cache_id",
            )
        if version is None or version == cache.version:
            version, base = cache.version, bytes_to_tokens(cache.token_ids)
        else:
            row = await self._version(session, cache, version)
            if row.status != "ready":
                raise Conflict(f"version {version} of {cid!r} is {row.status}", param="version")
            base = bytes_to_tokens(row.token_ids)
        has_request = any(x is not None for x in (prompt.prompt, prompt.messages, prompt.token_ids))
        extra = self._tokenize(prompt, continuation=True) if has_request else []
        ids = base + extra
        if len(ids) + sampling.max_tokens > eng.max_model_len:
            raise BadRequest(
                f"cache ({len(base)}) + request ({len(extra)}) + max_tokens "
                f"({sampling.max_tokens}) tokens exceed the model's {eng.max_model_len}",
                param="max_tokens",
            )
        keys = self._cache_keys(tenant, cache, base)
        align = eng.block_size or cache.chunk_tokens
        cap = ((len(ids) - 1) // align) * align
        expected = min(len(keys) * cache.chunk_tokens, cap)
        try:
            available = await self.store.longest_prefix(keys) if keys else 0
        except StoreError:
            available = 0
        available_tokens = min(available * cache.chunk_tokens, cap)
        if require_hit and (expected == 0 or available_tokens < expected):
            reason = "too_short" if expected == 0 else "evicted"
            raise CacheMiss(
                f"cache {cid!r} cannot be attached ({reason}) and require_hit is set",
                extra={"miss_reason": reason},
            )
        plan = (
            TransferPlan("load", tuple(keys[:available]), cache.chunk_tokens) if available else None
        )
        return cache, version, ids, plan, expected, available_tokens

    async def _record_hit(
        self, session: AsyncSession, cache: Cache, outcome: AttachOutcome
    ) -> None:
        """Transition: the cache was attached (and, with ``refresh_on_hit``, its lifetime
        re-granted from now); the attach's tokens are metered in the same transaction."""
        now = utcnow()
        cached = outcome.cached_tokens
        await metering.on_attach(
            session,
            cache,
            cached_tokens=cached,
            prefill_tokens=max(0, outcome.prompt_tokens - cached),
            output_tokens=len(outcome.generation.token_ids),
            request_id=None,
            at=now,
        )
        values: dict[str, Any] = {"hit_count": Cache.hit_count + 1, "last_used_at": now}
        if cache.refresh_on_hit:
            values["expires_at"] = now + timedelta(seconds=cache.ttl_seconds)
        await session.execute(
            update(Cache).where(Cache.id == cache.id, Cache.status == "ready").values(**values)
        )
        await session.commit()

    async def attach(
        self,
        session: AsyncSession,
        tenant: Tenant,
        cache_id: str | None,
        prompt: Prompt,
        sampling: Sampling,
        *,
        require_hit: bool = False,
        tag: str | None = None,
        version: int | None = None,
    ) -> AttachOutcome:
        """Generate with the cache named by ``cache_id`` or ``tag`` (exactly one) as the
        prompt's prefix; ``version`` defaults to the latest."""
        sampling = self.salted(tenant, sampling)
        cache, version, ids, plan, expected, available = await self._prepare_attach(
            session, tenant, cache_id, tag, version, prompt, sampling, require_hit
        )
        try:
            gen = await self._engine().generate(ids, sampling, plan)
        except EngineError as e:
            raise ServiceUnavailable(f"the engine failed: {e}") from e
        out = AttachOutcome(gen, cache, len(ids), expected, available, version)
        if require_hit and not out.hit:
            raise CacheMiss(
                f"cache {cache.id!r} could not be loaded ({out.miss_reason}) "
                "and require_hit is set",
                extra={"miss_reason": out.miss_reason},
            )
        await self._record_hit(session, cache, out)
        return out

    async def attach_stream(
        self,
        session: AsyncSession,
        tenant: Tenant,
        cache_id: str | None,
        prompt: Prompt,
        sampling: Sampling,
        *,
        require_hit: bool = False,
        tag: str | None = None,
        version: int | None = None,
    ) -> tuple[AttachOutcome, AsyncIterator[Generation]]:
        """Validate now (errors surface before the stream starts); the iterator yields deltas
        and fills the returned outcome's generation as it goes."""
        sampling = self.salted(tenant, sampling)
        cache, version, ids, plan, expected, available = await self._prepare_attach(
            session, tenant, cache_id, tag, version, prompt, sampling, require_hit
        )
        outcome = AttachOutcome(Generation(), cache, len(ids), expected, available, version)
        eng = self._engine()

        async def deltas() -> AsyncIterator[Generation]:
            total = outcome.generation
            async for d in eng.stream(ids, sampling, plan):
                total.absorb(d)
                yield d
            async with self.db.session() as s:  # the request's session may be closed by now
                await self._record_hit(s, cache, outcome)

        return outcome, deltas()

    # -- update ----------------------------------------------------------------------------
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
        """Transition: name, metadata, lifetime or ``refresh_on_hit`` changed."""
        for k, v in fields.items():
            setattr(cache, k, v)
        cache.updated_at = utcnow()
        await session.commit()

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
        tag = self._tag(tenant)
        try:
            for v in await self._ready_versions(session, cache.id):
                await self.store.set_storage_class(tag, cache.id, v.version, storage_class)
        except StoreError as e:
            raise ServiceUnavailable(f"the cache could not be moved: {e}") from e
        old = cache.storage_class
        cache.storage_class = storage_class
        cache.updated_at = utcnow()
        await metering.on_storage_class_changed(
            session, cache, old, storage_class, cache.updated_at
        )
        await session.commit()

    # -- delete ----------------------------------------------------------------------------
    async def delete(self, session: AsyncSession, tenant: Tenant, cache_id: str) -> Cache:
        """Delete the cache: ``deleted``, its tags gone, every version's manifest released."""
        cache = await self.get_live(session, tenant, cache_id)
        await self._delete(session, tenant, cache)
        return cache

    async def _delete(self, session: AsyncSession, tenant: Tenant, cache: Cache) -> None:
        """Transition: the cache is deleted (a prefill still running releases its own
        manifest when it finds out)."""
        now = utcnow()
        await self._retire(session, cache, "deleted", now)
        cache.deleted_at = now
        await session.commit()
        await self._release(self._tag(tenant), cache.id)

    async def _expire(self, session: AsyncSession, tenant: Tenant, cache: Cache) -> None:
        """Transition: the cache passed ``expires_at``."""
        await self._retire(session, cache, "expired", utcnow())
        await session.commit()
        await self._release(self._tag(tenant), cache.id)

    async def _retire(
        self, session: AsyncSession, cache: Cache, status: str, now: datetime
    ) -> None:
        """The database side of deletion and expiry (the caller commits)."""
        cache.status = status
        cache.reserved_tokens = 0
        cache.reserved_bytes = 0
        cache.updated_at = now
        await session.execute(
            update(CacheVersion)
            .where(CacheVersion.cache_id == cache.id, CacheVersion.status != "deleted")
            .values(status="deleted", deleted_at=now)
        )
        await session.execute(delete(CacheTag).where(CacheTag.cache_id == cache.id))
        # storage is metered until the deletion, or until ``expires_at`` for an expiry
        await metering.on_cache_ended(session, cache, status, now if status == "deleted" else None)

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
        await self._delete_version(session, tenant, cache, row, rest)
        return cache, row

    async def _delete_version(
        self,
        session: AsyncSession,
        tenant: Tenant,
        cache: Cache,
        row: CacheVersion,
        rest: Sequence[CacheVersion],
    ) -> None:
        """Transition: one version deleted; the latest remaining ready version becomes the
        cache's, and its stored bytes count the remaining versions' chunks."""
        stored = await self._unique_bytes(self._namespace(tenant), cache, rest) if rest else 0
        now = utcnow()
        row.status = "deleted"
        row.deleted_at = now
        if rest:
            latest = rest[-1]
            cache.version = latest.version
            cache.tokens = latest.tokens
            cache.token_ids = latest.token_ids
            cache.prefix_sha256 = latest.prefix_sha256
            cache.stored_chunks = latest.chunks
            cache.stored_bytes = stored
        cache.updated_at = now
        await session.commit()
        await self._release(self._tag(tenant), cache.id, [row.version])

    # -- tags ------------------------------------------------------------------------------
    async def put_tag(
        self, session: AsyncSession, tenant: Tenant, name: str, cache_id: str
    ) -> CacheTag:
        """Point the tenant's tag ``name`` at ``cache_id`` (created, or re-pointed atomically)."""
        cache = await self.get_live(session, tenant, cache_id)
        if cache.status == "failed":
            raise Conflict(f"cache {cache_id!r} failed; it cannot be tagged", param="cache_id")
        now = utcnow()
        insert = pg_insert if self.db.dialect == "postgresql" else sqlite_insert
        stmt = insert(CacheTag).values(
            tenant_id=tenant.id, name=name, cache_id=cache.id, created_at=now, updated_at=now
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[CacheTag.tenant_id, CacheTag.name],
            set_={"cache_id": cache.id, "updated_at": now},
        )
        await session.execute(stmt)
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

    # -- maintenance -----------------------------------------------------------------------
    async def sweep(self, session: AsyncSession, limit: int = 500) -> int:
        """Expire caches past ``expires_at`` and release their chunks, and fail prefills that
        lost their gateway; return how many caches were expired."""
        now = utcnow()
        rows = (
            await session.execute(
                select(Cache, Tenant)
                .join(Tenant, Tenant.id == Cache.tenant_id)
                .where(Cache.status.in_(("ready", "pending")), Cache.expires_at <= now)
                .limit(limit)
            )
        ).all()
        for cache, tenant in rows:
            await self._expire(session, tenant, cache)
        stale = (
            await session.execute(
                select(CacheVersion, Cache, Tenant)
                .join(Cache, Cache.id == CacheVersion.cache_id)
                .join(Tenant, Tenant.id == Cache.tenant_id)
                .where(
                    CacheVersion.status == "pending",
                    CacheVersion.created_at <= now - STALE_PENDING,
                )
                .limit(limit)
            )
        ).all()
        for v, cache, tenant in stale:
            if (cache.id, v.version) in self._jobs:
                continue
            await self._fail(session, self._job(tenant, cache, v.version, []), STALE_REASON)
        return len(rows)
