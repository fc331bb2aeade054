"""The usage ledger: append-only, idempotent rows in ``usage_events`` and
``cache_lifecycle_events``.

Recording adds an ``INSERT .. ON CONFLICT (idempotency_key) DO NOTHING`` to the caller's
session and never commits: the event lands in the same transaction as the action it meters,
and a replayed or retried event (same idempotency key) is ignored, never counted twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.db.base import utcnow
from kvaas.db.models import CacheLifecycleEvent, UsageEvent
from kvaas.db.upsert import insert_ignore, insert_ignore_many

#: Token and count meters recorded as usage events.
EVENT_METERS = ("prefill_tokens", "cached_tokens", "output_tokens", "cache_creations")
#: Meters integrated from the cache lifecycle.
STORAGE_METERS = ("storage_token_seconds", "stored_byte_seconds")
STORAGE_CLASSES = ("hot", "standard", "cold")
TIERS = ("memory", "redis", "disk")


async def _append(
    session: AsyncSession,
    event: type[UsageEvent] | type[CacheLifecycleEvent],
    values: dict[str, Any],
) -> bool:
    """Insert one ledger row unless its idempotency key is recorded; True if inserted."""
    values["recorded_at"] = utcnow()
    return await insert_ignore(session, event, values, ["idempotency_key"], returning=event.id)


async def record_usage(
    session: AsyncSession,
    *,
    idempotency_key: str,
    tenant_id: str,
    meter: str,
    quantity: int,
    occurred_at: datetime,
    cache_id: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> bool:
    """Append one usage event (not committed). Returns False when the key was already recorded.

    ``meter`` is one of :data:`EVENT_METERS`; ``quantity`` a non-negative integer.
    """
    one = [(idempotency_key, meter, quantity)]
    inserted = await record_usages(
        session,
        one,
        tenant_id=tenant_id,
        occurred_at=occurred_at,
        cache_id=cache_id,
        details=details,
    )
    return inserted == 1


async def record_usages(
    session: AsyncSession,
    quantities: Sequence[tuple[str, str, int]],
    *,
    tenant_id: str,
    occurred_at: datetime,
    cache_id: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> int:
    """Append several usage events of one request in one statement (not committed): each of
    ``quantities`` is ``(idempotency_key, meter, quantity)``, checked as :func:`record_usage`
    checks them. The number of events inserted (keys already recorded are skipped)."""
    for _, meter, quantity in quantities:
        if meter not in EVENT_METERS:
            raise ValueError(f"unknown meter {meter!r}; expected one of {EVENT_METERS}")
        if quantity < 0:
            raise ValueError(f"quantity must be >= 0, got {quantity}")
    now = utcnow()
    rows = [
        {
            "idempotency_key": key,
            "tenant_id": tenant_id,
            "meter": meter,
            "quantity": int(quantity),
            "occurred_at": occurred_at,
            "cache_id": cache_id,
            "details": dict(details or {}),
            "recorded_at": now,
        }
        for key, meter, quantity in quantities
    ]
    return await insert_ignore_many(
        session, UsageEvent, rows, ["idempotency_key"], returning=UsageEvent.id
    )


async def record_lifecycle(
    session: AsyncSession,
    *,
    idempotency_key: str,
    tenant_id: str,
    cache_id: str,
    kind: str,
    at: datetime,
    tokens: int = 0,
    storage_class: str | None = None,
    bytes_by_tier: Mapping[str, int] | None = None,
    reason: str | None = None,
) -> bool:
    """Append one lifecycle event of a cache (not committed); False when already recorded.

    ``started``/``resized``/``class_changed``/``tiers_changed`` carry the cache's full state
    from ``at`` on (tokens, storage class, bytes per tier); ``ended`` stops all storage.
    """
    return await _append(
        session,
        CacheLifecycleEvent,
        {
            "idempotency_key": idempotency_key,
            "tenant_id": tenant_id,
            "cache_id": cache_id,
            "kind": kind,
            "at": at,
            "tokens": int(tokens),
            "storage_class": storage_class,
            "bytes_by_tier": {k: int(v) for k, v in (bytes_by_tier or {}).items()},
            "reason": reason,
        },
    )
