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
``on_extend(s, cache, version,         an extend's prefill ran: the resize above, and the
prefill_tokens, at)``                  ``prefill_tokens`` it computed
``on_version_deleted(s, cache,         a version was deleted; the cache's (remaining) size from
version, at)``                         ``at`` on
``on_storage_class_changed(s, cache,   the storage class changed from ``old`` to ``new``
old, new, at)``
``on_tiers_changed(s, cache,           the bytes kept per tier changed (demotion, promotion)
bytes_by_tier, at)``
``on_cache_ended(s, cache, reason,     deleted (``at`` = the deletion time), expired (pass
at)``                                  ``at=cache.expires_at`` or leave it None), failed
``on_attach(s, cache, *,               an attach finished (streaming: when the stream ended or
cached_tokens, prefill_tokens,         its client went away, with the tokens produced until then)
output_tokens, request_id, at)``
``on_inference(s, tenant_id, *,        an engine request without a cache finished (a completion
prefill_tokens, output_tokens,         of the OpenAI-compatible routes; streaming: as for
request_id, at)``                      ``on_attach``)
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
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.db.base import utcnow
from kvaas.db.models import Cache
from kvaas.metering.ledger import record_lifecycle, record_usage, record_usages


def default_tiers(cache: Cache, storage_class: str | None = None) -> dict[str, int]:
    """Where a cache's bytes live by its storage class (``storage_class``, default the
    cache's own): ``cold`` on disk, else in Redis."""
    tier = "disk" if (storage_class or cache.storage_class) == "cold" else "redis"
    return {tier: int(cache.stored_bytes or 0)}


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


async def _lifecycle(
    session: AsyncSession,
    cache: Cache,
    kind: str,
    idempotency_key: str,
    at: datetime,
    *,
    storage_class: str | None = None,
    bytes_by_tier: Mapping[str, int] | None = None,
    reason: str | None = None,
) -> bool:
    """A lifecycle event of ``cache``. Every kind but ``ended`` states the cache's size and
    class from ``at`` on: its tokens, ``storage_class`` (default its own) and
    ``bytes_by_tier`` (default :func:`default_tiers`)."""
    tokens, cls, tiers = 0, None, None
    if kind != "ended":
        tokens, cls = cache.tokens, storage_class or cache.storage_class
        tiers = bytes_by_tier if bytes_by_tier is not None else default_tiers(cache, cls)
    return await record_lifecycle(
        session,
        idempotency_key=idempotency_key,
        tenant_id=cache.tenant_id,
        cache_id=cache.id,
        kind=kind,
        at=at,
        tokens=tokens,
        storage_class=cls,
        bytes_by_tier=tiers,
        reason=reason,
    )


async def _usage(
    session: AsyncSession,
    cache: Cache,
    idempotency_key: str,
    meter: str,
    quantity: int,
    at: datetime,
    details: Mapping[str, Any],
) -> None:
    """A usage event of ``cache``'s tenant on ``cache``; nothing for a zero quantity."""
    if quantity > 0:
        await record_usage(
            session,
            idempotency_key=idempotency_key,
            tenant_id=cache.tenant_id,
            meter=meter,
            quantity=quantity,
            occurred_at=at,
            cache_id=cache.id,
            details=details,
        )


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
    return await _lifecycle(
        session, cache, "started", key, at or utcnow(), bytes_by_tier=bytes_by_tier
    )


async def on_cache_extended(
    session: AsyncSession,
    cache: Cache,
    at: datetime | None = None,
    *,
    bytes_by_tier: Mapping[str, int] | None = None,
) -> bool:
    """The cache now holds ``cache.tokens`` tokens (version ``cache.version``) from ``at`` on."""
    key = f"lc:{cache.id}:v{cache.version}:resized"
    return await _lifecycle(
        session, cache, "resized", key, at or utcnow(), bytes_by_tier=bytes_by_tier
    )


async def on_version_deleted(
    session: AsyncSession, cache: Cache, version: int, at: datetime | None = None
) -> bool:
    """Version ``version`` of ``cache`` was deleted and the cache now holds ``cache.tokens``
    tokens and ``cache.stored_bytes`` bytes from ``at`` on (a ``resized`` event of its own:
    the remaining latest version's ``resized`` event, if any, describes an earlier size)."""
    key = f"lc:{cache.id}:v{version}:deleted"
    return await _lifecycle(session, cache, "resized", key, at or utcnow())


async def on_extend(
    session: AsyncSession, cache: Cache, version: int, prefill_tokens: int, at: datetime
) -> None:
    """Version ``version`` of ``cache`` is ready: its size from ``at`` on (as
    :func:`on_cache_extended`) and the ``prefill_tokens`` its extend computed."""
    await on_cache_extended(session, cache, at)
    await _usage(
        session,
        cache,
        f"extend:{cache.id}:v{version}:prefill_tokens",
        "prefill_tokens",
        prefill_tokens,
        at,
        {"op": "extend", "version": version},
    )


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
    key = f"lc:{cache.id}:class:{old}:{new}:{_ms(at)}"
    return await _lifecycle(
        session, cache, "class_changed", key, at, storage_class=new, bytes_by_tier=bytes_by_tier
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
    key = f"lc:{cache.id}:tiers:{_ms(at)}:{digest[:16]}"
    return await _lifecycle(session, cache, "tiers_changed", key, at, bytes_by_tier=bytes_by_tier)


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
    return await _lifecycle(session, cache, "ended", f"lc:{cache.id}:ended", at, reason=reason[:32])


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
    await _usage(
        session,
        cache,
        f"create:{cache.id}:prefill_tokens",
        "prefill_tokens",
        prefill_tokens,
        at,
        {**details, "op": "create"},
    )
    await _usage(
        session, cache, f"create:{cache.id}:cache_creations", "cache_creations", 1, at, details
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
    details = {"request_id": request_id, "op": "attach"}
    quantities = (
        ("cached_tokens", cached_tokens),
        ("prefill_tokens", prefill_tokens),
        ("output_tokens", output_tokens),
    )
    await record_usages(  # one statement for the request's meters
        session,
        [(f"attach:{rid}:{meter}", meter, qty) for meter, qty in quantities if qty > 0],
        tenant_id=cache.tenant_id,
        occurred_at=at,
        cache_id=cache.id,
        details=details,
    )


async def on_inference(
    session: AsyncSession,
    tenant_id: str,
    *,
    prefill_tokens: int,
    output_tokens: int,
    request_id: str,
    at: datetime | None = None,
) -> None:
    """An engine request of ``tenant_id`` on no cache computed ``prefill_tokens`` prompt tokens
    (those the engine's own prefix cache held excluded) and generated ``output_tokens``.
    Idempotent by ``request_id``: the same request is metered once."""
    at = at or utcnow()
    details = {"request_id": request_id, "op": "inference"}
    quantities = (("prefill_tokens", prefill_tokens), ("output_tokens", output_tokens))
    await record_usages(
        session,
        [(f"inference:{request_id}:{meter}", meter, qty) for meter, qty in quantities if qty > 0],
        tenant_id=tenant_id,
        occurred_at=at,
        details=details,
    )
