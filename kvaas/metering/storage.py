"""Exact meters over a period: storage integrated from the cache lifecycle, tokens summed
from the usage ledger.

``storage_token_seconds[class]`` = Σ over caches of tokens * seconds the cache existed in that
storage class within ``[start, end)``; ``stored_byte_seconds[tier]`` the same for bytes kept
in each tier. Time is counted in whole seconds: every timestamp is floored to its second
(UTC epoch), so a period's meters are exact integers and adjacent periods add up exactly.

The integration is a pure function (:func:`build_segments`, :func:`integrate`) over the
lifecycle events; :func:`meter_usage` loads them from the database.
"""

from __future__ import annotations

import calendar
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.db.models import Cache, CacheLifecycleEvent, UsageEvent
from kvaas.metering.ledger import EVENT_METERS, STORAGE_CLASSES, TIERS


def epoch_s(at: datetime) -> int:
    """``at`` floored to its whole UTC second (exact integer arithmetic, no float)."""
    if at.tzinfo is None:
        raise ValueError("naive datetime")
    return calendar.timegm(at.astimezone(UTC).utctimetuple())


@dataclass(frozen=True)
class CacheState:
    """What a cache keeps from a change on: tokens, storage class, bytes per tier."""

    tokens: int
    storage_class: str
    bytes_by_tier: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Change:
    """A lifecycle event reduced to what integration needs. ``state`` None means ended."""

    cache_id: str
    at: int
    seq: int
    state: CacheState | None
    event_id: int | None = None


@dataclass(frozen=True)
class Segment:
    """A cache in one state over ``[start, end)`` seconds; ``end`` None: still open."""

    cache_id: str
    start: int
    end: int | None
    state: CacheState


@dataclass
class StorageTotals:
    token_seconds: dict[str, int] = field(default_factory=dict)
    byte_seconds: dict[str, int] = field(default_factory=dict)
    #: token-seconds per (cache id, storage class): the usage behind each storage line.
    per_cache: dict[tuple[str, str], int] = field(default_factory=dict)


def build_segments(
    changes: Iterable[Change], caps: Mapping[str, int] | None = None
) -> list[Segment]:
    """Turn lifecycle changes into constant-state segments.

    Changes apply per cache in ``(at, seq)`` order: a change with a state sets the cache's
    state from ``at`` on; ``ended`` is terminal (later changes are ignored). A cache that never
    ended stays open. ``caps`` names each cache's expiry: no cache exists past it, ended or not
    (an expiry recorded late by the sweep still stops storage at ``expires_at``).
    """
    caps = caps or {}
    by_cache: dict[str, list[Change]] = defaultdict(list)
    for c in changes:
        by_cache[c.cache_id].append(c)
    out: list[Segment] = []
    for cache_id, cs in by_cache.items():
        cs.sort(key=lambda c: (c.at, c.seq))
        segs: list[Segment] = []
        current: CacheState | None = None
        since = 0
        ended = False
        for c in cs:
            if current is not None and c.at > since:
                segs.append(Segment(cache_id, since, c.at, current))
                since = c.at
            elif current is None:
                since = c.at
            if c.state is None:
                ended = True
                break
            current = c.state
        if not ended and current is not None:
            segs.append(Segment(cache_id, since, None, current))
        cap = caps.get(cache_id)
        for seg in segs:
            if cap is None:
                out.append(seg)
            elif seg.start < cap:
                end = cap if seg.end is None else min(seg.end, cap)
                out.append(Segment(cache_id, seg.start, end, seg.state))
    return out


def integrate(segments: Iterable[Segment], start: int, end: int) -> StorageTotals:
    """Storage meters of ``segments`` within ``[start, end)`` (epoch seconds)."""
    totals = StorageTotals(
        token_seconds=dict.fromkeys(STORAGE_CLASSES, 0), byte_seconds=dict.fromkeys(TIERS, 0)
    )
    for seg in segments:
        lo = max(seg.start, start)
        hi = end if seg.end is None else min(seg.end, end)
        if hi <= lo:
            continue
        secs = hi - lo
        cls = seg.state.storage_class
        ts = seg.state.tokens * secs
        totals.token_seconds[cls] = totals.token_seconds.get(cls, 0) + ts
        key = (seg.cache_id, cls)
        totals.per_cache[key] = totals.per_cache.get(key, 0) + ts
        for tier, n in seg.state.bytes_by_tier:
            totals.byte_seconds[tier] = totals.byte_seconds.get(tier, 0) + n * secs
    return totals


def change_of(ev: CacheLifecycleEvent) -> Change:
    state = None
    if ev.kind != "ended":
        state = CacheState(
            tokens=int(ev.tokens),
            storage_class=ev.storage_class or "standard",
            bytes_by_tier=tuple(sorted((k, int(v)) for k, v in (ev.bytes_by_tier or {}).items())),
        )
    return Change(ev.cache_id, epoch_s(ev.at), int(ev.id), state, int(ev.id))


@dataclass
class Usage:
    """Every meter of one tenant over ``[start, end)``."""

    start: datetime
    end: datetime
    storage_token_seconds: dict[str, int]
    stored_byte_seconds: dict[str, int]
    prefill_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    cache_creations: int = 0
    per_cache: dict[tuple[str, str], int] = field(default_factory=dict)

    def meter(self, name: str) -> int:
        return int(getattr(self, name))

    @property
    def is_empty(self) -> bool:
        return not any(self.storage_token_seconds.values()) and not any(
            self.meter(m) for m in EVENT_METERS
        )


async def load_segments(
    session: AsyncSession, tenant_id: str, start: datetime, end: datetime
) -> tuple[list[Segment], list[int]]:
    """The tenant's storage segments that may overlap ``[start, end)``, and the ids of the
    lifecycle events behind them. Open segments end at the cache's current expiry."""
    ended_before = (
        select(CacheLifecycleEvent.cache_id)
        .where(
            CacheLifecycleEvent.tenant_id == tenant_id,
            CacheLifecycleEvent.kind == "ended",
            CacheLifecycleEvent.at < start,
        )
        .scalar_subquery()
    )
    rows = (
        await session.scalars(
            select(CacheLifecycleEvent)
            .where(
                CacheLifecycleEvent.tenant_id == tenant_id,
                CacheLifecycleEvent.at < end,
                CacheLifecycleEvent.cache_id.not_in(ended_before),
            )
            .order_by(CacheLifecycleEvent.id)
        )
    ).all()
    changes = [change_of(ev) for ev in rows]
    ids = sorted({c.cache_id for c in changes})
    caps: dict[str, int] = {}
    if ids:
        for cid, expires_at in await session.execute(
            select(Cache.id, Cache.expires_at).where(Cache.id.in_(ids))
        ):
            caps[cid] = epoch_s(expires_at)
    return build_segments(changes, caps), [c.event_id for c in changes if c.event_id]


async def sum_events(
    session: AsyncSession, tenant_id: str, start: datetime, end: datetime
) -> dict[str, int]:
    """Σ quantity per token meter of the tenant's usage events with start <= at < end."""
    out = dict.fromkeys(EVENT_METERS, 0)
    rows = await session.execute(
        select(UsageEvent.meter, func.coalesce(func.sum(UsageEvent.quantity), 0))
        .where(
            UsageEvent.tenant_id == tenant_id,
            UsageEvent.occurred_at >= start,
            UsageEvent.occurred_at < end,
        )
        .group_by(UsageEvent.meter)
    )
    for meter, total in rows:
        out[meter] = int(total)
    return out


async def event_ids(
    session: AsyncSession,
    tenant_id: str,
    meter: str,
    start: datetime,
    end: datetime,
    limit: int = 1000,
) -> list[str]:
    """Public ids of the usage events behind a meter's total (at most ``limit``, oldest first):
    the ``id`` that ``/v1/usage/events`` shows, never the row's sequence number."""
    rows = await session.scalars(
        select(UsageEvent.public_id)
        .where(
            UsageEvent.tenant_id == tenant_id,
            UsageEvent.meter == meter,
            UsageEvent.occurred_at >= start,
            UsageEvent.occurred_at < end,
        )
        .order_by(UsageEvent.occurred_at, UsageEvent.id)
        .limit(limit)
    )
    return list(rows)


async def meter_usage(
    session: AsyncSession, tenant_id: str, start: datetime, end: datetime
) -> Usage:
    """All meters of ``tenant_id`` within ``[start, end)``."""
    segments, _lifecycle_ids = await load_segments(session, tenant_id, start, end)
    totals = integrate(segments, epoch_s(start), epoch_s(end))
    sums = await sum_events(session, tenant_id, start, end)
    return Usage(
        start=start,
        end=end,
        storage_token_seconds=totals.token_seconds,
        stored_byte_seconds=totals.byte_seconds,
        per_cache=totals.per_cache,
        **sums,
    )


async def tenants_with_activity(session: AsyncSession, start: datetime, end: datetime) -> list[str]:
    """Tenants with usage events in ``[start, end)`` or a cache stored at some point before
    ``end`` that had not ended before ``start`` (candidates for an invoice)."""
    used = select(UsageEvent.tenant_id).where(
        UsageEvent.occurred_at >= start, UsageEvent.occurred_at < end
    )
    ended_before = select(CacheLifecycleEvent.cache_id).where(
        CacheLifecycleEvent.kind == "ended", CacheLifecycleEvent.at < start
    )
    stored = select(CacheLifecycleEvent.tenant_id).where(
        and_(
            CacheLifecycleEvent.at < end,
            or_(CacheLifecycleEvent.cache_id.not_in(ended_before)),
        )
    )
    ids = set(await session.scalars(used)) | set(await session.scalars(stored))
    return sorted(ids)


def bucket_bounds(start: int, end: int, step: int) -> Sequence[tuple[int, int]]:
    """``[start, end)`` cut into ``step``-second buckets aligned to ``step`` (the last may be
    shorter)."""
    out = []
    t = start - start % step
    while t < end:
        out.append((max(t, start), min(t + step, end)))
        t += step
    return out
