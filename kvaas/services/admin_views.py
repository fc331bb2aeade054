"""Read-only aggregates for the operators' dashboard: what is stored, how often caches are
hit (token-weighted), what that saves, what it earns, and storage over time.

Nothing here writes. Queries stay on indexes where one exists: usage events are read per
tenant through ``ix_usage_events_tenant_at`` (the tenant ids are given as a list, so the index
range scans run per tenant), storage over time through ``ix_cache_lifecycle_events_tenant_at``.
The inventory of live caches is one grouped scan of the ``caches`` rows in the listed statuses
(a few rows of output whatever the number of caches).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Integer, cast, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.billing.budget import MONTH_TO_DATE, month_start
from kvaas.billing.pricebook import PriceBook
from kvaas.db.models import (
    LISTED_STATUSES,
    Budget,
    Cache,
    CacheLifecycleEvent,
    Tenant,
    UsageEvent,
)
from kvaas.metering.ledger import STORAGE_CLASSES, TIERS
from kvaas.metering.storage import epoch_s, tenants_with_activity

HOUR = 3600


@dataclass
class StoredRow:
    """Live caches of one (storage class, model, codec scheme): count, tokens, bytes."""

    storage_class: str
    model: str
    scheme: str
    caches: int
    tokens: int
    stored_bytes: int


@dataclass
class Inventory:
    """Tenants by status, listed caches by status, and what the live ones hold."""

    tenants: dict[str, int]
    caches: dict[str, int]
    stored: list[StoredRow]

    def by_class(self) -> dict[str, tuple[int, int, int]]:
        """(caches, tokens, bytes) per storage class, every class present."""
        out = {c: (0, 0, 0) for c in STORAGE_CLASSES}
        for r in self.stored:
            n, t, b = out.get(r.storage_class, (0, 0, 0))
            out[r.storage_class] = (n + r.caches, t + r.tokens, b + r.stored_bytes)
        return out


def _listed() -> Any:
    return Cache.status.in_([literal_column(f"'{s}'") for s in LISTED_STATUSES])


async def tenant_ids(session: AsyncSession) -> list[str]:
    return list(await session.scalars(select(Tenant.id).order_by(Tenant.id)))


async def inventory(session: AsyncSession, now: datetime) -> Inventory:
    """Counts of tenants and caches, and the tokens and bytes of the live (``ready`` or
    ``pending``, not past ``expires_at``) caches per class, model and scheme."""
    tenants = dict(
        (s, int(n))
        for s, n in await session.execute(
            select(Tenant.status, func.count()).group_by(Tenant.status)
        )
    )
    rows = await session.execute(
        select(
            Cache.status,
            Cache.storage_class,
            Cache.model,
            Cache.scheme,
            func.count(),
            func.coalesce(func.sum(Cache.tokens), 0),
            func.coalesce(func.sum(Cache.stored_bytes), 0),
        )
        .where(_listed(), Cache.expires_at > now)
        .group_by(Cache.status, Cache.storage_class, Cache.model, Cache.scheme)
    )
    caches: dict[str, int] = dict.fromkeys(LISTED_STATUSES, 0)
    stored: list[StoredRow] = []
    for status, cls, model, scheme, n, tokens, nbytes in rows:
        caches[status] += int(n)
        if status == "ready":
            stored.append(StoredRow(cls, model, scheme, int(n), int(tokens), int(nbytes)))
    return Inventory(tenants, caches, stored)


def compression_ratio(
    stored: Sequence[StoredRow], raw_bytes_per_token: dict[str, int]
) -> float | None:
    """Raw KV bytes (tokens times the model's uncompressed bytes per token) over stored bytes, for
    the models whose raw size is known; ``None`` when nothing is stored."""
    raw = sum(
        r.tokens * raw_bytes_per_token[r.model] for r in stored if r.model in raw_bytes_per_token
    )
    held = sum(r.stored_bytes for r in stored if r.model in raw_bytes_per_token)
    return raw / held if raw and held else None


# --- attaches: hit rate, savings, trend --------------------------------------------------------
@dataclass
class AttachStats:
    """Token-weighted attach hit rate: cached tokens over all the prompt tokens attaches ran
    (cached + prefilled), in total, per day, per hour (with the count of attaches) and per
    tenant, over ``[since, until)``."""

    since: datetime
    until: datetime
    cached_tokens: int = 0
    prefill_tokens: int = 0
    attaches: int = 0
    hourly: list[tuple[datetime, int, int, int]] = field(default_factory=list)
    daily: list[tuple[datetime, int, int]] = field(default_factory=list)
    by_tenant: list[tuple[str, int, int, int]] = field(default_factory=list)

    @property
    def hit_rate(self) -> float | None:
        total = self.cached_tokens + self.prefill_tokens
        return self.cached_tokens / total if total else None


def hour_index(session: AsyncSession, col: Any) -> Any:
    """SQL for ``col``'s whole hours since the epoch (UTC), on PostgreSQL and SQLite."""
    if session.get_bind().dialect.name == "postgresql":
        return cast(func.floor(func.extract("epoch", col) / HOUR), Integer)
    return cast(func.strftime("%s", col), Integer) / HOUR


def _attach_events(ids: Sequence[str], since: datetime, until: datetime) -> Any:
    return (
        UsageEvent.tenant_id.in_(list(ids)),
        UsageEvent.occurred_at >= since,
        UsageEvent.occurred_at < until,
        UsageEvent.idempotency_key.like("attach:%"),
        UsageEvent.meter.in_(("cached_tokens", "prefill_tokens")),
    )


def rate(cached: int, prefill: int) -> float | None:
    return cached / (cached + prefill) if cached + prefill else None


async def attach_stats(
    session: AsyncSession, now: datetime, *, days: int = 14, by_tenant: bool = True
) -> AttachStats:
    """Attach statistics over the last ``days`` days (whole hours, up to ``now``)."""
    until = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    since = until - timedelta(days=days)
    stats = AttachStats(since, until)
    ids = await tenant_ids(session)
    if not ids:
        return stats
    where = _attach_events(ids, since, until)
    hour = hour_index(session, UsageEvent.occurred_at).label("h")
    per_hour: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
    for h, meter, qty, n in await session.execute(
        select(hour, UsageEvent.meter, func.sum(UsageEvent.quantity), func.count())
        .where(*where)
        .group_by(hour, UsageEvent.meter)
    ):
        slot = per_hour[int(h)]
        if meter == "cached_tokens":
            slot[0] += int(qty)
            slot[2] += int(n)  # one cached_tokens event per attach
        else:
            slot[1] += int(qty)
    first = epoch_s(since) // HOUR
    per_day: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for h in range(first, epoch_s(until) // HOUR):
        cached, prefill, n = per_hour.get(h, (0, 0, 0))
        stats.cached_tokens += cached
        stats.prefill_tokens += prefill
        stats.attaches += n
        stats.hourly.append((datetime.fromtimestamp(h * HOUR, UTC), cached, prefill, n))
        day = per_day[h // 24]
        day[0] += cached
        day[1] += prefill
    stats.daily = [
        (datetime.fromtimestamp(d * 86400, UTC), c, p) for d, (c, p) in sorted(per_day.items())
    ]
    if by_tenant:
        per_tenant: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        for tid, meter, qty, n in await session.execute(
            select(
                UsageEvent.tenant_id, UsageEvent.meter, func.sum(UsageEvent.quantity), func.count()
            )
            .where(*where)
            .group_by(UsageEvent.tenant_id, UsageEvent.meter)
        ):
            slot = per_tenant[tid]
            if meter == "cached_tokens":
                slot[0] += int(qty)
                slot[2] += int(n)
            else:
                slot[1] += int(qty)
        stats.by_tenant = sorted(
            ((tid, c, p, n) for tid, (c, p, n) in per_tenant.items()),
            key=lambda r: -(r[1] + r[2]),
        )
    return stats


async def attach_by_model(
    session: AsyncSession, since: datetime, until: datetime
) -> list[tuple[str, int, int]]:
    """(model, cached tokens, prefilled tokens) of attaches in ``[since, until)``."""
    ids = await tenant_ids(session)
    if not ids:
        return []
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for model, meter, qty in await session.execute(
        select(Cache.model, UsageEvent.meter, func.sum(UsageEvent.quantity))
        .join(Cache, Cache.id == UsageEvent.cache_id)
        .where(*_attach_events(ids, since, until))
        .group_by(Cache.model, UsageEvent.meter)
    ):
        out[model][0 if meter == "cached_tokens" else 1] += int(qty)
    return sorted(((m, c, p) for m, (c, p) in out.items()), key=lambda r: -(r[1] + r[2]))


# --- money ----------------------------------------------------------------------------------------
async def revenue_month_to_date(
    session: AsyncSession, pricebook: PriceBook, now: datetime
) -> tuple[int, dict[str, int]]:
    """What the month's usage up to ``now`` costs, in total and per tenant with usage (minor
    units), priced like an invoice (the budget check's running totals)."""
    start = month_start(now)
    per: dict[str, int] = {}
    for tid in await tenants_with_activity(session, start, now):
        per[tid] = await MONTH_TO_DATE.running(session, tid, pricebook, now)
    return sum(per.values()), per


async def budgets(session: AsyncSession, tenant_ids: Sequence[str]) -> dict[str, int]:
    """The monthly budgets (minor units) of those of ``tenant_ids`` that have one."""
    if not tenant_ids:
        return {}
    rows = await session.execute(
        select(Budget.tenant_id, Budget.amount_minor).where(Budget.tenant_id.in_(list(tenant_ids)))
    )
    return {tid: int(amount) for tid, amount in rows}


async def tenant_spend(
    session: AsyncSession, tenant_id: str, pricebook: PriceBook, now: datetime
) -> int:
    """The tenant's month-to-date spend (minor units)."""
    return await MONTH_TO_DATE.running(session, tenant_id, pricebook, now)


# --- storage over time ----------------------------------------------------------------------------
async def storage_over_time(
    session: AsyncSession, now: datetime, *, hours: int = 48, tenant_id: str | None = None
) -> list[tuple[datetime, dict[str, int]]]:
    """Bytes held per tier at each whole hour of the last ``hours`` hours (and now), from the
    cache lifecycle (what the storage meters bill), for every tenant or one. Only the history
    of caches still stored at the window's start, or started since, is read."""
    points = [
        now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=h)
        for h in range(hours - 1, -1, -1)
    ] + [now]
    ids = [tenant_id] if tenant_id else await tenant_ids(session)
    deltas: list[tuple[int, int, dict[str, int]]] = []  # (second, order, bytes per tier)
    start = points[0]
    for tid in ids:
        state: dict[str, dict[str, int]] = {}
        # caches that ended before the window hold nothing in it: their history is not read
        ended_before = (
            select(CacheLifecycleEvent.cache_id)
            .where(
                CacheLifecycleEvent.tenant_id == tid,
                CacheLifecycleEvent.kind == "ended",
                CacheLifecycleEvent.at < start,
            )
            .scalar_subquery()
        )
        rows = await session.execute(
            select(
                CacheLifecycleEvent.cache_id,
                CacheLifecycleEvent.kind,
                CacheLifecycleEvent.at,
                CacheLifecycleEvent.bytes_by_tier,
            )
            .where(
                CacheLifecycleEvent.tenant_id == tid,
                CacheLifecycleEvent.at <= now,
                CacheLifecycleEvent.cache_id.not_in(ended_before),
            )
            .order_by(CacheLifecycleEvent.id)
        )
        for cid, kind, at, tiers in rows:
            old = state.pop(cid, {})
            new = {} if kind == "ended" else {k: int(v) for k, v in (tiers or {}).items()}
            if new:
                state[cid] = new
            diff = {t: new.get(t, 0) - old.get(t, 0) for t in set(old) | set(new)}
            if any(diff.values()):
                deltas.append((epoch_s(at), len(deltas), diff))
    deltas.sort()
    out: list[tuple[datetime, dict[str, int]]] = []
    held = dict.fromkeys(TIERS, 0)
    i = 0
    for p in points:
        ps = epoch_s(p)
        while i < len(deltas) and deltas[i][0] <= ps:
            for t, d in deltas[i][2].items():
                held[t] = held.get(t, 0) + d
            i += 1
        out.append((p, dict(held)))
    return out
