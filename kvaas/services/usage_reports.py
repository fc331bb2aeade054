"""A tenant's usage as ``/v1/usage`` reports it: meters per hour or day bucket, and the usage
events behind them.

Storage is integrated per bucket from the cache lifecycle (:mod:`kvaas.metering.storage`),
exact to the second; token meters are the sums of the usage events whose ``occurred_at`` falls
in the bucket. Buckets are aligned to whole hours or days (UTC); the first and last may be
partial. Ranges are half-open, ``[start, end)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.billing.budget import month_start
from kvaas.db.base import utcnow
from kvaas.db.models import UsageEvent
from kvaas.errors import BadRequest
from kvaas.metering.ledger import EVENT_METERS, STORAGE_CLASSES
from kvaas.metering.storage import bucket_bounds, epoch_s, integrate, load_segments

Granularity = Literal["hour", "day"]
#: Most buckets one report holds.
MAX_BUCKETS = 2000
STEP: dict[Granularity, int] = {"hour": 3600, "day": 86400}


@dataclass
class MeterValues:
    """Every meter over some span: storage token-seconds per class, then the token meters."""

    storage_token_seconds: dict[str, int]
    events: dict[str, int]


@dataclass
class Bucket(MeterValues):
    start: datetime
    end: datetime


@dataclass
class Report:
    start: datetime
    end: datetime
    granularity: Granularity
    totals: MeterValues
    buckets: list[Bucket]


def aware(at: datetime | None, default: datetime) -> datetime:
    """``at`` in UTC (a naive time is taken as UTC), or ``default`` when ``None``."""
    if at is None:
        return default
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def report_range(
    frm: datetime | None, to: datetime | None, now: datetime | None = None
) -> tuple[datetime, datetime]:
    """The report's ``[start, end)``: from the month's start to the end of the current second
    by default (the meters count whole seconds, so what a request just recorded shows at
    once). 400 unless ``end`` is after ``start``."""
    now = now or utcnow()
    start = aware(frm, month_start(now))
    end = aware(to, now.replace(microsecond=0) + timedelta(seconds=1))
    if end <= start:
        raise BadRequest("`to` must be after `from`", param="to")
    return start, end


async def usage_report(
    session: AsyncSession,
    tenant_id: str,
    frm: datetime | None,
    to: datetime | None,
    granularity: Granularity,
) -> Report:
    """The tenant's meters in ``[frm, to)`` (defaults: :func:`report_range`) per bucket, and
    their totals. 400 for more than :data:`MAX_BUCKETS` buckets."""
    start, end = report_range(frm, to)
    step = STEP[granularity]
    bounds = bucket_bounds(epoch_s(start), epoch_s(end), step)
    if len(bounds) > MAX_BUCKETS:
        raise BadRequest(
            f"{len(bounds)} buckets; at most {MAX_BUCKETS}: shorten the range or use days",
            param="granularity",
        )
    segments, _ = await load_segments(session, tenant_id, start, end)
    rows = await session.execute(
        select(UsageEvent.meter, UsageEvent.quantity, UsageEvent.occurred_at).where(
            UsageEvent.tenant_id == tenant_id,
            UsageEvent.occurred_at >= start,
            UsageEvent.occurred_at < end,
        )
    )
    base = bounds[0][0] if bounds else 0
    first_step = base - base % step
    sums: list[dict[str, int]] = [dict.fromkeys(EVENT_METERS, 0) for _ in bounds]
    for meter, qty, at in rows:
        i = (epoch_s(at) - first_step) // step
        if 0 <= i < len(sums) and meter in sums[i]:
            sums[i][meter] += int(qty)
    totals = MeterValues(dict.fromkeys(STORAGE_CLASSES, 0), dict.fromkeys(EVENT_METERS, 0))
    buckets: list[Bucket] = []
    for (lo, hi), s in zip(bounds, sums, strict=True):
        storage = integrate(segments, lo, hi).token_seconds
        for cls, v in storage.items():
            totals.storage_token_seconds[cls] = totals.storage_token_seconds.get(cls, 0) + v
        for m, v in s.items():
            totals.events[m] += v
        buckets.append(
            Bucket(
                storage_token_seconds=storage,
                events=s,
                start=datetime.fromtimestamp(lo, UTC),
                end=datetime.fromtimestamp(hi, UTC),
            )
        )
    return Report(start, end, granularity, totals, buckets)


async def usage_events(
    session: AsyncSession,
    tenant_id: str,
    *,
    meter: str | None,
    frm: datetime | None,
    to: datetime | None,
    after: str | None,
    limit: int,
) -> tuple[Sequence[UsageEvent], bool]:
    """The tenant's usage events in ``[frm, to)`` (defaults: all of them up to a day ahead),
    of ``meter`` when given (400 for an unknown one), recorded after the tenant's event whose
    public id is ``after`` (400 for an id the tenant has not), oldest first: at most ``limit``
    of them, and whether more follow."""
    start = aware(frm, datetime(1970, 1, 1, tzinfo=UTC))
    end = aware(to, utcnow() + timedelta(days=1))
    q = select(UsageEvent).where(
        UsageEvent.tenant_id == tenant_id,
        UsageEvent.occurred_at >= start,
        UsageEvent.occurred_at < end,
    )
    if meter is not None:
        if meter not in EVENT_METERS:
            raise BadRequest(f"unknown meter {meter!r}; one of {EVENT_METERS}", param="meter")
        q = q.where(UsageEvent.meter == meter)
    if after is not None:
        row_id = await session.scalar(
            select(UsageEvent.id).where(
                UsageEvent.tenant_id == tenant_id, UsageEvent.public_id == after
            )
        )
        if row_id is None:
            raise BadRequest(f"no usage event {after!r}: pass the `id` of an event", param="after")
        q = q.where(UsageEvent.id > row_id)
    rows = list(await session.scalars(q.order_by(UsageEvent.id).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
