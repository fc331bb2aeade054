"""Create and extend: a new cache (version 1) or version ``n + 1``, prefilled by the engine and
stored, synchronously or as a background job the service owns.

Transitions committed here: :meth:`CreateOps._begin_create` / :meth:`CreateOps._begin_extend`
(rows inserted ``pending``, quota reserved) and :meth:`CreateOps._complete` (a version became
``ready``, its usage metered in the same transaction).

A prefill runs while it holds a slot of the service's gate, as its tenant's turn comes; one
refused there (``429 engine_busy``) fails its version with that reason.

Readiness: a version is ``ready`` only when every one of its chunks is in the store. The engine
stores chunks in the background and may finish the prefill before they land; its report
(``pending_chunks`` in the connector's ``kv_transfer_params``) says so, and the prefill then
waits for the chunks to appear (up to :data:`SAVE_WAIT_S`) before it checks them, so a failed
background save fails the version exactly as a failed synchronous one does ("only n of m
chunks reached the store").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timedelta

from sqlalchemy import select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.billing.budget import check_create_allowed
from kvaas.db import claims
from kvaas.db.base import utcnow
from kvaas.db.models import Cache, CacheVersion, Tenant
from kvaas.engine import Engine, EngineError, Generation, Sampling
from kvaas.errors import BadRequest, Conflict, NotFound, ServiceUnavailable
from kvaas.metering import hooks as metering
from kvaas.services import outbox, quotas
from kvaas.services.caches.core import CacheCore, _rows
from kvaas.services.caches.identity import (
    PrefillJob,
    bytes_to_tokens,
    prefix_sha256,
    tokens_to_bytes,
)
from kvaas.services.caches.records import (
    NOT_FOUND,
    SHUTDOWN_REASON,
    CreateResult,
    CreateSpec,
)
from kvaas.services.fairness import EngineBusy
from kvaas.services.prompts import Prompt
from kvaas.store.errors import StoreError
from kvaas.store.keys import ChunkKey, stored_chunks

log = logging.getLogger("kvaas.caches")

#: longest wait, in seconds, for chunks the engine reported still being saved (a setting to be)
SAVE_WAIT_S = 60.0
#: first and longest pause between two presence checks while waiting for them
SAVE_POLL_S = (0.002, 0.05)


async def wait_stored(
    store_sizes: Callable[[list[ChunkKey]], Awaitable[list[int | None]]],
    keys: list[ChunkKey],
    timeout_s: float,
) -> list[int | None]:
    """Sizes of ``keys`` (``store_sizes``: the store's ``sizes_many``), asked again with a
    growing pause until every chunk is present or ``timeout_s`` has passed; the last answer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pause = SAVE_POLL_S[0]
    while True:
        sizes = await store_sizes(keys)
        if all(sizes) or loop.time() >= deadline:
            return sizes
        await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
        pause = min(pause * 2, SAVE_POLL_S[1])


class CreateOps(CacheCore):
    """Create, extend and the prefills behind them."""

    async def create(
        self, session: AsyncSession, tenant: Tenant, spec: CreateSpec, *, wait: bool = True
    ) -> CreateResult:
        """Create a cache. ``wait``: prefill now and answer when it is stored (503 if that
        fails); otherwise answer at once with the ``pending`` cache and prefill in the
        background."""
        eng = self._engine()
        s = self.settings
        self.prompts.check_model(spec.model)
        ids = await self.prompts.tokenize(spec.prompt, continuation=False)
        self.prompts.require_tokens(ids)
        self.prompts.check_cacheable(ids)
        ttl = self._ttl(spec.ttl_seconds)
        if len(ids) < s.chunk_tokens:  # it would hold no full chunk: nothing to store
            raise BadRequest(
                f"a cache needs at least {s.chunk_tokens} tokens of {eng.model.name!r} (one "
                f"stored chunk); this prompt has {len(ids)}",
                param="prompt",
            )
        scheme = spec.scheme or s.default_compression
        storage_class = spec.storage_class or s.default_storage_class
        keys = self._keys(tenant, ids, scheme)
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
            prefix_sha256=prefix_sha256(ids),
            chunk_tokens=s.chunk_tokens,
            scheme=scheme,
            storage_class=storage_class,
            meta=dict(spec.metadata),
            hit_count=0,
            stored_chunks=0,
            stored_bytes=0,
            reserved_tokens=0,
            reserved_bytes=self._reserve_bytes(scheme, s.chunk_tokens, len(ids)),
            ttl_seconds=int(ttl.total_seconds()),
            refresh_on_hit=spec.refresh_on_hit,
            expires_at=now + ttl,
            created_at=now,
        )
        await check_create_allowed(session, tenant, self.settings)
        await self._begin_create(session, tenant, cache)
        job = self._job(tenant, cache, 1, ids, keys)
        if not wait:
            self._spawn(job, tenant.id)
            return CreateResult(cache, None, None)
        gen = await self._prefill(session, job, tenant.id)  # completes `cache` (the same row)
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
                defaults=quotas.Limits.from_settings(self.settings),
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
                    chunks=stored_chunks(cache.tokens, cache.chunk_tokens),
                    stored_bytes=0,
                    created_at=cache.created_at,
                    lease_expires_at=self._lease_until(),
                )
            )
            # the request's Idempotency-Key names the cache in the transaction that makes it
            await claims.record_resource(session, tenant.id, cache.id)
            await session.commit()

    async def extend(
        self, session: AsyncSession, tenant: Tenant, cache_id: str, prompt: Prompt
    ) -> CreateResult:
        """Create version ``n + 1`` = the latest version's tokens + ``prompt``'s. Only the new
        tokens are computed and only the new chunks written."""
        self._engine()  # 503 without an engine, before any lookup
        cache = await self.get_live(session, tenant, cache_id)
        self._require_current(cache)
        new = await self.prompts.tokenize(prompt, continuation=True, generation_prompt=False)
        self.prompts.require_tokens(new, "the extension is empty")
        base = bytes_to_tokens(cache.token_ids)
        ids = base + new
        self.prompts.check_cacheable(ids)
        keys = self._cache_keys(tenant, cache, ids, None)
        n_base = len(base) // cache.chunk_tokens  # the parent's full chunks: the same keys
        try:  # reuse what the store still holds; anything missing is computed and written
            skip = await self.store.longest_prefix(keys[:n_base]) if n_base else 0
        except StoreError:
            skip = 0
        reserve_bytes = self._reserve_bytes(cache.scheme, cache.chunk_tokens, len(ids), n_base)
        await check_create_allowed(session, tenant, self.settings)  # the budget, as a create
        version = await self._begin_extend(session, tenant, cache, ids, len(new), reserve_bytes)
        job = self._job(tenant, cache, version, ids, keys, skip)
        gen = await self._prefill(session, job, tenant.id)
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
                defaults=quotas.Limits.from_settings(self.settings),
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
                    prefix_sha256=prefix_sha256(ids),
                    chunks=stored_chunks(len(ids), cache.chunk_tokens),
                    stored_bytes=0,
                    created_at=utcnow(),
                    lease_expires_at=self._lease_until(),
                )
            )
            cache.reserved_tokens = new_tokens
            cache.reserved_bytes = reserve_bytes
            await session.commit()
        return version

    async def _prefill(self, session: AsyncSession, job: PrefillJob, tenant_id: str) -> Generation:
        """Store the manifest, run the engine with a save plan (in a slot of ``tenant_id``),
        check the chunks and complete the version; on failure mark it failed and raise 503
        (429 when the gate refused the prefill)."""
        eng = self._engine()
        with self._prefilling(job):
            return await self._run_prefill(session, job, tenant_id, eng)

    async def _run_prefill(
        self, session: AsyncSession, job: PrefillJob, tenant_id: str, eng: Engine
    ) -> Generation:
        try:
            await self.store.put_manifest(job.manifest())
            once = Sampling(max_tokens=1, temperature=0.0, cache_salt=job.salt)
            async with self.gate.slot(tenant_id):
                gen = await eng.generate(job.ids, once, job.plan())
            report = gen.connector
            if report.get("pending_chunks") and not report.get("save_failed"):
                sizes = await wait_stored(self.store.sizes_many, job.stored_keys, SAVE_WAIT_S)
            else:
                sizes = await self.store.sizes_many(job.stored_keys)
        except EngineBusy as e:
            await self._fail(session, job, e.message)
            raise
        except (StoreError, EngineError) as e:
            reason = await self._fail(session, job, e)
            raise ServiceUnavailable(f"the cache could not be stored: {reason}") from e
        if not all(sizes):
            n = sum(1 for x in sizes if x)
            reason = f"only {n} of {len(sizes)} chunks reached the store"
            await self._fail(session, job, reason)
            raise ServiceUnavailable(f"the cache could not be stored: {reason}")
        prefilled = max(0, gen.prompt_tokens - gen.cached_tokens)
        await self._complete(session, job, sum(x or 0 for x in sizes), prefilled)
        return gen

    async def _complete(
        self, session: AsyncSession, job: PrefillJob, stored_bytes: int, prefill_tokens: int
    ) -> None:
        """Transition: version ``job.version`` is stored and ``ready`` (a create when it is
        version 1, else an extend); it becomes the cache's latest version and the reservation
        is replaced by the bytes stored. If the cache or version was deleted (or expired, or
        failed) meanwhile, its release is recorded instead (404).

        Conditional, and no lock is held across store I/O: the bytes of the cache's ready
        versions are measured first; then one transaction takes the cache row
        (``UPDATE ... WHERE status IN ('pending', 'ready')``: PostgreSQL's row lock, SQLite's
        write lock), turns the version ``ready`` only if it is still ``pending``, and measures
        again (under the lock, rarely) if the ready versions changed meanwhile."""
        ready = await self._ready_versions(session, job.cache_id)
        cache = await session.get(Cache, job.cache_id, populate_existing=True)
        row = await session.get(CacheVersion, (job.cache_id, job.version), populate_existing=True)
        await session.commit()  # end the read: nothing is held while the store is asked
        done = 0
        if cache is not None and row is not None:
            total = await self._unique_bytes(job.namespace, cache, [*ready, row])
            taken = await session.execute(
                update(Cache)
                .where(Cache.id == job.cache_id, Cache.status.in_(("pending", "ready")))
                .values(updated_at=utcnow())
            )
            done = _rows(taken) and _rows(
                await session.execute(
                    update(CacheVersion)
                    .where(
                        CacheVersion.cache_id == job.cache_id,
                        CacheVersion.version == job.version,
                        CacheVersion.status == "pending",
                    )
                    .values(status="ready", stored_bytes=stored_bytes, lease_expires_at=None)
                )
            )
        if not done or cache is None or row is None:
            rows = outbox.queue_release(
                session, job.slot, job.cache_id, [job.version], "deleted", job.stored_keys
            )
            await session.commit()
            await self._settle(session, rows)
            raise NotFound(NOT_FOUND.format(id=job.cache_id), param="cache_id")
        now_ready = await self._ready_versions(session, job.cache_id)
        if [v.version for v in now_ready] != sorted([*(v.version for v in ready), job.version]):
            total = await self._unique_bytes(job.namespace, cache, now_ready)
        await session.refresh(row)
        await session.refresh(cache)
        cache.stored_bytes = total
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
        await metering.on_extend(session, cache, version, prefill_tokens, now)

    def _spawn(self, job: PrefillJob, tenant_id: str) -> None:
        key = (job.cache_id, job.version)
        task = asyncio.create_task(self._background(job, tenant_id), name=f"prefill {key}")
        self._jobs[key] = task
        task.add_done_callback(lambda _t: self._jobs.pop(key, None))

    async def _background(self, job: PrefillJob, tenant_id: str) -> None:
        try:
            async with self.db.session() as session:
                await self._prefill(session, job, tenant_id)
        except asyncio.CancelledError:
            async with self.db.session() as session:
                await self._fail(session, job, SHUTDOWN_REASON)
            raise
        except (ServiceUnavailable, NotFound, EngineBusy) as e:  # failed / released already
            log.info("background prefill of %s v%d: %s", job.cache_id, job.version, e.message)
        except Exception as e:
            log.exception("background prefill of %s v%d failed", job.cache_id, job.version)
            with contextlib.suppress(Exception):
                async with self.db.session() as session:
                    await self._fail(session, job, e)

    def _lease_until(self) -> datetime:
        return utcnow() + timedelta(seconds=self.settings.prefill_lease_seconds)

    @contextlib.contextmanager
    def _prefilling(self, job: PrefillJob) -> Iterator[None]:
        """While the block runs, ``job``'s version is this process's: its lease is renewed."""
        key = (job.cache_id, job.version)
        self._running[key] = self._running.get(key, 0) + 1
        try:
            yield
        finally:
            self._running[key] -= 1
            if not self._running[key]:
                del self._running[key]

    async def renew_leases(self, session: AsyncSession) -> int:
        """Renew the leases of the pending versions this process is prefilling (the
        maintenance loop calls it); return how many were renewed."""
        keys = list(self._running)
        n = 0
        for start in range(0, len(keys), 200):
            batch = keys[start : start + 200]
            res = await session.execute(
                update(CacheVersion)
                .where(
                    tuple_(CacheVersion.cache_id, CacheVersion.version).in_(batch),
                    CacheVersion.status == "pending",
                )
                .values(lease_expires_at=self._lease_until())
            )
            n += _rows(res)
        await session.commit()
        return n

    @property
    def running_jobs(self) -> int:
        return len(self._jobs)

    async def drain(self, grace_s: float = 10.0) -> None:
        """Wait up to ``grace_s`` for background prefills, then cancel the rest; each cancelled
        one marks its cache (or version) ``failed`` before it ends. Usage recordings under way
        (of streams that ended) are waited for."""
        await asyncio.gather(*self.settling, return_exceptions=True)
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
