"""The cache service: create a cache (prefill + store), attach it, and keep its lifecycle.

Create: tokenize, compute the chunk keys in the tenant's namespace, insert the cache row
(``pending``), store the manifest (taking chunk references *before* any chunk is written, so
garbage collection can never delete them), run the prefill with a ``save`` plan, then check
that every chunk reached the store and mark the cache ``ready`` (or ``failed`` with a reason,
releasing its references).

Attach: the cache's tokens come first, the request's after them; the engine runs with a
``load`` plan for the chunks the store still holds. The result says whether the cache was hit
and, if not, why: ``too_short`` (the cache is shorter than one chunk), ``evicted`` (chunks are
gone from every tier), ``load_failed`` (a chunk could not be read or verified; the engine
recomputed it). ``require_hit`` turns a miss into ``409 cache_miss``.

A cache that is deleted or past ``expires_at`` is ``404`` for everyone: to its owner and to
any other tenant alike, with the same message.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas import codec
from kvaas.config import Settings
from kvaas.connector.params import TransferPlan
from kvaas.db.base import utcnow
from kvaas.db.models import Cache, Tenant
from kvaas.db.session import Database
from kvaas.engine import Engine, EngineError, Generation, Sampling
from kvaas.errors import BadRequest, Conflict, NotFound, ServiceUnavailable
from kvaas.store.errors import StoreError
from kvaas.store.keys import ChunkKey, chunk_keys, derive_namespace, namespace_tag
from kvaas.store.manifest import Manifest
from kvaas.store.tiered import TieredStore


class CacheMiss(Conflict):
    type = "cache_miss"
    description = "The cache could not be attached and require_hit was set."


class EngineUnavailable(ServiceUnavailable):
    type = "engine_unavailable"
    description = "No engine is running to serve this request."


NOT_FOUND = "no cache with id {id!r} (it may have expired or been deleted)"


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


@dataclass
class CreateResult:
    cache: Cache
    prefill_tokens: int
    ttft_ms: float | None


@dataclass
class AttachOutcome:
    generation: Generation
    cache: Cache
    prompt_tokens: int
    expected_tokens: int
    available_tokens: int

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


def tokens_to_bytes(ids: Sequence[int]) -> bytes:
    return np.asarray(ids, dtype="<i4").tobytes()


def bytes_to_tokens(raw: bytes) -> list[int]:
    return np.frombuffer(raw, dtype="<i4").tolist()


class CacheService:
    """Cache operations over the metadata database, the store and the engine."""

    def __init__(
        self, settings: Settings, store: TieredStore, engine: Engine | None, db: Database
    ) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.engine = engine

    # -- helpers ---------------------------------------------------------------------------
    def _engine(self) -> Engine:
        if self.engine is None:
            raise EngineUnavailable("this gateway runs without an engine (KVAAS_ENGINE=none)")
        return self.engine

    def _tokenize(self, p: Prompt, *, continuation: bool) -> list[int]:
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
            return eng.model.encode_messages(
                p.messages, add_generation_prompt=continuation, continuation=continuation
            )
        assert p.prompt is not None
        return eng.model.encode(p.prompt, add_special_tokens=not continuation)

    def _keys(self, tenant: Tenant, ids: Sequence[int], compression: str) -> list[ChunkKey]:
        ns = derive_namespace(bytes.fromhex(tenant.namespace_secret))
        return chunk_keys(
            ids,
            namespace=ns,
            model_fingerprint=self._engine().model.fingerprint,
            codec_id=f"{compression}:{codec.scheme_id(compression)}",
            chunk_tokens=self.settings.chunk_tokens,
        )

    def _tag(self, tenant: Tenant) -> str:
        return namespace_tag(derive_namespace(bytes.fromhex(tenant.namespace_secret)))

    def _ttl(self, ttl: int | None) -> timedelta:
        s = self.settings
        ttl = s.default_ttl_seconds if ttl is None else ttl
        if not s.min_ttl_seconds <= ttl <= s.max_ttl_seconds:
            raise BadRequest(
                f"ttl_seconds must lie in [{s.min_ttl_seconds}, {s.max_ttl_seconds}], got {ttl}",
                param="ttl_seconds",
            )
        return timedelta(seconds=ttl)

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

    async def _expire(self, session: AsyncSession, tenant: Tenant, cache: Cache) -> None:
        cache.status = "expired"
        await session.commit()
        await self._release(tenant, cache)

    async def _release(self, tenant: Tenant, cache: Cache) -> None:
        # known gap: on a store outage the manifest (and so its chunks) stays referenced
        with contextlib.suppress(StoreError):
            await self.store.delete_manifest(self._tag(tenant), cache.id, cache.version)

    # -- create ----------------------------------------------------------------------------
    async def create(self, session: AsyncSession, tenant: Tenant, spec: CreateSpec) -> CreateResult:
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
        limit = eng.max_model_len - 1
        if len(ids) > limit:
            raise BadRequest(
                f"the prompt has {len(ids)} tokens; this model caches at most {limit}",
                param="prompt",
            )
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
            prefix_sha256=hashlib.sha256(tokens_to_bytes(ids)).hexdigest(),
            chunk_tokens=s.chunk_tokens,
            compression=compression,
            storage_class=storage_class,
            meta=dict(spec.metadata),
            hit_count=0,
            stored_chunks=0,
            stored_bytes=0,
            expires_at=now + ttl,
            created_at=now,
        )
        session.add(cache)
        await session.commit()
        manifest = Manifest(
            cache_id=cache.id,
            version=1,
            namespace_tag=self._tag(tenant),
            chunk_keys=tuple(keys),
            token_count=len(ids),
            chunk_tokens=s.chunk_tokens,
            codec=compression,
            model_fingerprint=eng.model.fingerprint,
            storage_class=storage_class,  # type: ignore[arg-type]
        )
        try:
            await self.store.put_manifest(manifest)
            plan = TransferPlan("save", tuple(keys), s.chunk_tokens, compression, storage_class)
            gen = await eng.generate(ids, Sampling(max_tokens=1, temperature=0.0), plan)
            present = await self.store.exists_many(keys)
        except (StoreError, EngineError) as e:
            await self._fail(session, tenant, cache, str(e))
            raise ServiceUnavailable(f"the cache could not be stored: {e}") from e
        if not all(present):
            n = sum(present)
            reason = f"only {n} of {len(keys)} chunks reached the store"
            await self._fail(session, tenant, cache, reason)
            raise ServiceUnavailable(f"the cache could not be stored: {reason}")
        cache.stored_chunks = len(keys)
        cache.stored_bytes = sum(s or 0 for s in await self.store.sizes_many(keys))
        cache.status = "ready"
        await session.commit()
        return CreateResult(cache, gen.prompt_tokens - gen.cached_tokens, gen.ttft_ms)

    async def _fail(self, session: AsyncSession, tenant: Tenant, cache: Cache, reason: str) -> None:
        cache.status = "failed"
        cache.failure_reason = reason
        await session.commit()
        await self._release(tenant, cache)

    # -- attach ----------------------------------------------------------------------------
    async def _prepare_attach(
        self,
        session: AsyncSession,
        tenant: Tenant,
        cache_id: str,
        prompt: Prompt,
        sampling: Sampling,
        require_hit: bool,
    ) -> tuple[Cache, list[int], TransferPlan | None, int, int]:
        eng = self._engine()
        cache = await self.get_live(session, tenant, cache_id)
        if cache.status != "ready":
            raise Conflict(f"cache {cache_id!r} is {cache.status}, not ready", param="cache_id")
        if cache.model_fingerprint != eng.model.fingerprint:
            raise Conflict(
                f"cache {cache_id!r} was made by another model version than the one served now",
                param="cache_id",
            )
        has_request = any(x is not None for x in (prompt.prompt, prompt.messages, prompt.token_ids))
        extra = self._tokenize(prompt, continuation=True) if has_request else []
        ids = bytes_to_tokens(cache.token_ids) + extra
        if len(ids) + sampling.max_tokens > eng.max_model_len:
            raise BadRequest(
                f"cache ({cache.tokens}) + request ({len(extra)}) + max_tokens "
                f"({sampling.max_tokens}) tokens exceed the model's {eng.max_model_len}",
                param="max_tokens",
            )
        keys = self._keys(tenant, bytes_to_tokens(cache.token_ids), cache.compression)
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
                f"cache {cache_id!r} cannot be attached ({reason}) and require_hit is set",
                extra={"miss_reason": reason},
            )
        plan = (
            TransferPlan("load", tuple(keys[:available]), cache.chunk_tokens) if available else None
        )
        return cache, ids, plan, expected, available_tokens

    async def _record_hit(self, session: AsyncSession, cache: Cache) -> None:
        await session.execute(
            update(Cache)
            .where(Cache.id == cache.id)
            .values(hit_count=Cache.hit_count + 1, last_used_at=utcnow())
        )
        await session.commit()

    async def attach(
        self,
        session: AsyncSession,
        tenant: Tenant,
        cache_id: str,
        prompt: Prompt,
        sampling: Sampling,
        *,
        require_hit: bool = False,
    ) -> AttachOutcome:
        cache, ids, plan, expected, available = await self._prepare_attach(
            session, tenant, cache_id, prompt, sampling, require_hit
        )
        try:
            gen = await self._engine().generate(ids, sampling, plan)
        except EngineError as e:
            raise ServiceUnavailable(f"the engine failed: {e}") from e
        out = AttachOutcome(gen, cache, len(ids), expected, available)
        if require_hit and not out.hit:
            raise CacheMiss(
                f"cache {cache_id!r} could not be loaded ({out.miss_reason}) "
                "and require_hit is set",
                extra={"miss_reason": out.miss_reason},
            )
        await self._record_hit(session, cache)
        return out

    async def attach_stream(
        self,
        session: AsyncSession,
        tenant: Tenant,
        cache_id: str,
        prompt: Prompt,
        sampling: Sampling,
        *,
        require_hit: bool = False,
    ) -> tuple[AttachOutcome, AsyncIterator[Generation]]:
        """Validate now (errors surface before the stream starts); the iterator yields deltas
        and fills the returned outcome's generation as it goes."""
        cache, ids, plan, expected, available = await self._prepare_attach(
            session, tenant, cache_id, prompt, sampling, require_hit
        )
        outcome = AttachOutcome(Generation(), cache, len(ids), expected, available)
        eng = self._engine()

        async def deltas() -> AsyncIterator[Generation]:
            total = outcome.generation
            async for d in eng.stream(ids, sampling, plan):
                total.absorb(d)
                yield d
            async with self.db.session() as s:  # the request's session may be closed by now
                await self._record_hit(s, cache)

        return outcome, deltas()

    # -- maintenance -----------------------------------------------------------------------
    async def sweep(self, session: AsyncSession, limit: int = 500) -> int:
        """Expire caches past ``expires_at`` and release their chunks; return how many."""
        rows = (
            await session.execute(
                select(Cache, Tenant)
                .join(Tenant, Tenant.id == Cache.tenant_id)
                .where(Cache.status.in_(("ready", "pending")), Cache.expires_at <= utcnow())
                .limit(limit)
            )
        ).all()
        for cache, tenant in rows:
            await self._expire(session, tenant, cache)
        return len(rows)
