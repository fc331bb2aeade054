"""Attach: generate with a stored cache's tokens as the prompt's prefix, loading their KV from
the store instead of computing it; streaming too. The attach's tokens are metered, and the hit
recorded, in :meth:`AttachOps._record_hit` (one transaction), once per request id.

No database connection is held while the engine runs: the lookup's transaction ends before
generation starts, and the hit is recorded in a short transaction of its own afterwards, so
the number of concurrent attaches (streams included) is bounded by the engine and the gate,
not by the database pool. An engine failure is ``503 engine_unavailable``.

The engine runs while the request holds a slot of the service's gate (its tenant's turn); a
stream holds it until it ends or its client goes, and is metered then with the tokens
produced so far (:func:`kvaas.services.streams.metered`)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

from sqlalchemy import bindparam, update
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.connector.params import TransferPlan
from kvaas.db.base import utcnow
from kvaas.db.models import Cache, Tenant
from kvaas.engine import EngineError, Generation, Sampling
from kvaas.errors import Conflict, EngineUnavailable
from kvaas.metering import hooks as metering
from kvaas.services.caches.core import CacheCore
from kvaas.services.caches.identity import bytes_to_tokens
from kvaas.services.caches.records import AttachOutcome, CacheMiss, CacheRef
from kvaas.services.prompts import Prompt
from kvaas.services.streams import metered
from kvaas.store.errors import StoreError
from kvaas.store.keys import partial_tokens


class AttachOps(CacheCore):
    """Attach, plain and streaming."""

    async def _prepare_attach(
        self,
        session: AsyncSession,
        tenant: Tenant,
        ref: CacheRef,
        prompt: Prompt,
        sampling: Sampling,
    ) -> tuple[Sampling, tuple[Cache, int, list[int], TransferPlan | None, int, int]]:
        """What an attach runs: ``sampling`` with the tenant's salt, and the cache, version,
        token ids, load plan and the expected and available cached tokens (``409`` for a
        ``require_hit`` attach that cannot hit)."""
        eng = self._engine()
        cache = await self.resolve(session, tenant, cache_id=ref.cache_id, tag=ref.tag)
        version, require_hit = ref.version, ref.require_hit
        cid = cache.id
        self._require_current(cache)
        if version is None or version == cache.version:
            version, base = cache.version, bytes_to_tokens(cache.token_ids)
            chunks = cache.stored_chunks
        else:
            row = await self._version(session, cache, version)
            if row.status != "ready":
                raise Conflict(f"version {version} of {cid!r} is {row.status}", param="version")
            base, chunks = bytes_to_tokens(row.token_ids), row.chunks
        extra = await self.prompts.tokenize(prompt, continuation=True) if prompt.given else []
        ids = base + extra
        self.prompts.check_generation(
            len(ids), sampling.max_tokens, f"cache ({len(base)}) + request ({len(extra)})"
        )
        keys = self._cache_keys(tenant, cache, base, chunks)
        tail = partial_tokens(len(base), cache.chunk_tokens, chunks)
        whole = self._load_plan(tenant, cache, keys, tail)
        align = eng.block_size or cache.chunk_tokens

        def loadable(tokens: int) -> int:  # the engine's rule: whole blocks, one token left
            return min(tokens, len(ids) - 1) // align * align

        expected = loadable(whole.tokens)
        try:
            stored = await self.store.longest_prefix(self._stored(keys)) if keys else 0
            available = stored // self._shards  # whole chunks: every rank's piece stored
        except StoreError:
            available = 0
        available_tokens = loadable(whole.tokens_in(available))
        if (
            version == cache.version
            and available_tokens < expected
            and await self._lost(session, tenant, cache)
        ):
            # gone for good, not just out of reach: say so, and stop billing its storage
            await self._mark_lost(session, tenant, cache)
        if require_hit and (expected == 0 or available_tokens < expected):
            reason = "too_short" if expected == 0 else "evicted"
            raise CacheMiss(
                f"cache {cid!r} cannot be attached ({reason}) and require_hit is set",
                extra={"miss_reason": reason},
            )
        # the engine's scheduler trusts this lookup instead of repeating it (checked)
        plan = replace(whole.leading(available), checked=True) if available else None
        salted = self.salted(tenant, sampling)
        return salted, (cache, version, ids, plan, expected, available_tokens)

    @staticmethod
    async def _meter_attach(
        session: AsyncSession, cache: Cache, outcome: AttachOutcome, request_id: str
    ) -> None:
        cached = outcome.cached_tokens
        await metering.on_attach(
            session,
            cache,
            cached_tokens=cached,
            prefill_tokens=max(0, outcome.prompt_tokens - cached),
            output_tokens=len(outcome.generation.token_ids),
            request_id=request_id,
            at=utcnow(),
        )

    async def _record_hit(
        self, session: AsyncSession, cache: Cache, outcome: AttachOutcome, request_id: str
    ) -> None:
        """Transition: the cache was attached (and, with ``refresh_on_hit``, its lifetime
        re-granted from now); the attach's tokens are metered in the same transaction."""
        now = utcnow()
        await self._meter_attach(session, cache, outcome, request_id)
        params: dict[str, Any] = {"cache_id": cache.id, "now": now}
        if cache.refresh_on_hit:
            params["expires_at"] = now + timedelta(seconds=cache.ttl_seconds)
            await session.execute(_HIT_REFRESHING, params)
        else:
            await session.execute(_HIT, params)
        await session.commit()

    async def attach(
        self,
        session: AsyncSession,
        tenant: Tenant,
        ref: CacheRef,
        prompt: Prompt,
        sampling: Sampling,
        request_id: str | None = None,
    ) -> AttachOutcome:
        """Generate with the cache ``ref`` names (by id or tag, exactly one; ``version``
        defaults to the latest) as the prompt's prefix. ``request_id`` (default: a new one)
        meters the request once. ``429 engine_busy`` when the tenant's turn does not come."""
        rid = request_id or _request_id()
        sampling, (cache, version, ids, plan, expected, available) = await self._prepare_attach(
            session, tenant, ref, prompt, sampling
        )
        await session.commit()  # the lookup's transaction ends: no connection held meanwhile
        try:
            async with self.gate.slot(tenant.id):
                gen = await self._engine().generate(ids, sampling, plan)
        except EngineError as e:
            raise EngineUnavailable.failed(e) from e
        out = AttachOutcome(gen, cache, len(ids), expected, available, version)
        if ref.require_hit and not out.hit:  # refused, but the engine's work is paid for
            await self._meter_attach(session, cache, out, rid)
            await session.commit()
            raise CacheMiss(
                f"cache {cache.id!r} could not be loaded ({out.miss_reason}) "
                "and require_hit is set",
                extra={"miss_reason": out.miss_reason},
            )
        await self._record_hit(session, cache, out, rid)
        return out

    async def attach_stream(
        self,
        session: AsyncSession,
        tenant: Tenant,
        ref: CacheRef,
        prompt: Prompt,
        sampling: Sampling,
        request_id: str | None = None,
    ) -> tuple[AttachOutcome, AsyncIterator[Generation]]:
        """Validate and start now: errors (``429 engine_busy`` and an engine failure before
        the first token included) surface before the stream does. The iterator yields deltas
        and fills the returned outcome's generation as it goes; when it ends, fails or is
        closed the attach is recorded once (``request_id``, default a new one), metered with
        the tokens produced until then."""
        rid = request_id or _request_id()
        sampling, (cache, version, ids, plan, expected, available) = await self._prepare_attach(
            session, tenant, ref, prompt, sampling
        )
        await session.commit()  # the lookup's transaction ends: no connection held meanwhile
        outcome = AttachOutcome(Generation(), cache, len(ids), expected, available, version)

        async def record() -> None:
            async with self.db.session() as s:  # the request's session may be closed by now
                await self._record_hit(s, cache, outcome, rid)

        deltas = metered(
            self._engine().stream(ids, sampling, plan),
            outcome.generation.absorb,
            record,
            self.settling,
        )
        try:
            return outcome, await self.gate.stream(tenant.id, deltas)
        except EngineError as e:
            raise EngineUnavailable.failed(e) from e


#: A hit on a ready cache, built once (the loaded row is not brought up to date: nothing
#: reads it after the hit).
_HIT = (
    update(Cache)
    .where(Cache.id == bindparam("cache_id"), Cache.status == "ready")
    .values(hit_count=Cache.hit_count + 1, last_used_at=bindparam("now"))
    .execution_options(synchronize_session=False)
)
#: The same, re-granting the cache's lifetime from now (``refresh_on_hit``).
_HIT_REFRESHING = _HIT.values(expires_at=bindparam("expires_at"))


def _request_id() -> str:
    return f"att_{uuid.uuid4().hex[:24]}"
