"""Hooks the cache service calls inside its own transactions to meter what it does.

Every hook adds rows to the caller's session and never commits: call it before the
``session.commit()`` of the action it meters, so both land (or roll back) together. Every
hook is idempotent: calling it twice for the same fact records it once.

=====================================  ===========================================================
hook                                   call it when
=====================================  ===========================================================
``on_create(s, cache, prefill_tokens,  the create's prefill ran (before the commit that marks the
request_id, at)``                      cache ``ready``); records ``prefill_tokens`` and one
                                       ``cache_creations``
``on_cache_ready(s, cache, at)``       the cache became ``ready``: storage starts at ``at``
``on_cache_extended(s, cache, at)``    a new version with more tokens is ready (``cache.tokens``
                                       and ``cache.version`` already updated)
``on_storage_class_changed(s, cache,   the storage class changed from ``old`` to ``new``
old, new, at)``
``on_tiers_changed(s, cache,           the bytes kept per tier changed (demotion, promotion)
bytes_by_tier, at)``
``on_cache_ended(s, cache, reason,     deleted (``at`` = the deletion time), expired (pass
at)``                                  ``at=cache.expires_at`` or leave it None), failed
``on_attach(s, cache, *,               an attach finished (streaming: after the last delta)
cached_tokens, prefill_tokens,
output_tokens, request_id, at)``
=====================================  ===========================================================

Storage is metered per second from these lifecycle facts; a cache that is never ended is
metered until its ``expires_at``.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.db.base import utcnow
from kvaas.db.models import Cache
from kvaas.metering.ledger import record_lifecycle, record_usage


def default_tiers(cache: Cache, storage_class: str | None = None) -> dict[str, int]:
    """Where a cache's bytes live by its storage class (``storage_class``, default the
    cache's own): ``cold`` on disk, else in Redis."""
    tier = "disk" if (storage_class or cache.storage_class) == "cold" else "redis"
    return {tier: int(cache.stored_bytes or 0)}


async def _record_size(
    session: AsyncSession,
    cache: Cache,
    kind: str,
    idempotency_key: str,
    at: datetime | None,
    bytes_by_tier: Mapping[str, int] | None,
) -> bool:
    """A lifecycle event stating the cache's current size and class from ``at`` on."""
    return await record_lifecycle(
        session,
        idempotency_key=idempotency_key,
        tenant_id=cache.tenant_id,
        cache_id=cache.id,
        kind=kind,
        at=at or utcnow(),
        tokens=cache.tokens,
        storage_class=cache.storage_class,
        bytes_by_tier=bytes_by_tier if bytes_by_tier is not None else default_tiers(cache),
    )


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


async def on_cache_ready(
    session: AsyncSession,
    cache: Cache,
    at: datetime | None = None,
    *,
    bytes_by_tier: Mapping[str, int] | None = None,
) -> bool:
    """Storage of ``cache`` (``cache.tokens`` tokens in ``cache.storage_class``) starts at
    ``at``. Returns False when already recorded."""
    key = f"lc:{cache.id}:started"
    return await _record_size(session, cache, "started", key, at, bytes_by_tier)


async def on_cache_extended(
    session: AsyncSession,
    cache: Cache,
    at: datetime | None = None,
    *,
    bytes_by_tier: Mapping[str, int] | None = None,
) -> bool:
    """The cache now holds ``cache.tokens`` tokens (version ``cache.version``) from ``at`` on."""
    key = f"lc:{cache.id}:v{cache.version}:resized"
    return await _record_size(session, cache, "resized", key, at, bytes_by_tier)


async def on_storage_class_changed(
    session: AsyncSession,
    cache: Cache,
    old: str,
    new: str,
    at: datetime | None = None,
    *,
    bytes_by_tier: Mapping[str, int] | None = None,
) -> bool:
    """The cache is kept in storage class ``new`` (was ``old``) from ``at`` on."""
    at = at or utcnow()
    tiers = dict(bytes_by_tier) if bytes_by_tier is not None else default_tiers(cache, new)
    return await record_lifecycle(
        session,
        idempotency_key=f"lc:{cache.id}:class:{old}:{new}:{_ms(at)}",
        tenant_id=cache.tenant_id,
        cache_id=cache.id,
        kind="class_changed",
        at=at,
        tokens=cache.tokens,
        storage_class=new,
        bytes_by_tier=tiers,
    )


async def on_tiers_changed(
    session: AsyncSession,
    cache: Cache,
    bytes_by_tier: Mapping[str, int],
    at: datetime | None = None,
) -> bool:
    """The cache's bytes are kept as ``bytes_by_tier`` (e.g. ``{"disk": n}``) from ``at`` on."""
    at = at or utcnow()
    digest = hashlib.sha256(json.dumps(dict(bytes_by_tier), sort_keys=True).encode()).hexdigest()
    return await record_lifecycle(
        session,
        idempotency_key=f"lc:{cache.id}:tiers:{_ms(at)}:{digest[:16]}",
        tenant_id=cache.tenant_id,
        cache_id=cache.id,
        kind="tiers_changed",
        at=at,
        tokens=cache.tokens,
        storage_class=cache.storage_class,
        bytes_by_tier=bytes_by_tier,
    )


async def on_cache_ended(
    session: AsyncSession,
    cache: Cache,
    reason: str,
    at: datetime | None = None,
) -> bool:
    """Storage of the cache stops at ``at`` (``reason``: ``deleted``, ``expired``, ``failed``).
    For an expiry, ``at`` defaults to ``cache.expires_at`` (not the time the sweep ran)."""
    if at is None:
        at = cache.expires_at if reason == "expired" else utcnow()
    return await record_lifecycle(
        session,
        idempotency_key=f"lc:{cache.id}:ended",
        tenant_id=cache.tenant_id,
        cache_id=cache.id,
        kind="ended",
        at=at,
        reason=reason[:32],
    )


async def on_create(
    session: AsyncSession,
    cache: Cache,
    prefill_tokens: int,
    request_id: str | None = None,
    at: datetime | None = None,
) -> None:
    """A create prefilled ``prefill_tokens`` tokens: records them and one cache creation."""
    at = at or utcnow()
    details = {"request_id": request_id} if request_id else {}
    if prefill_tokens > 0:
        await record_usage(
            session,
            idempotency_key=f"create:{cache.id}:prefill_tokens",
            tenant_id=cache.tenant_id,
            meter="prefill_tokens",
            quantity=prefill_tokens,
            occurred_at=at,
            cache_id=cache.id,
            details={**details, "op": "create"},
        )
    await record_usage(
        session,
        idempotency_key=f"create:{cache.id}:cache_creations",
        tenant_id=cache.tenant_id,
        meter="cache_creations",
        quantity=1,
        occurred_at=at,
        cache_id=cache.id,
        details=details,
    )


async def on_attach(
    session: AsyncSession,
    cache: Cache,
    *,
    cached_tokens: int,
    prefill_tokens: int,
    output_tokens: int,
    request_id: str | None,
    at: datetime | None = None,
) -> None:
    """An attach read ``cached_tokens`` from the cache, prefilled ``prefill_tokens`` (the
    suffix and anything recomputed) and generated ``output_tokens``. ``request_id`` makes it
    idempotent (the same request is metered once); None records it unconditionally."""
    at = at or utcnow()
    rid = request_id or f"anon-{secrets.token_hex(12)}"
    for meter, qty in (
        ("cached_tokens", cached_tokens),
        ("prefill_tokens", prefill_tokens),
        ("output_tokens", output_tokens),
    ):
        if qty > 0:
            await record_usage(
                session,
                idempotency_key=f"attach:{rid}:{meter}",
                tenant_id=cache.tenant_id,
                meter=meter,
                quantity=qty,
                occurred_at=at,
                cache_id=cache.id,
                details={"request_id": request_id, "op": "attach"},
            )
