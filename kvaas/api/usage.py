"""``/v1/usage``: the calling tenant's running meters, bucketed by hour or day, and the usage
events behind them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlalchemy import select

from kvaas.api.deps import Auth, SessionDep
from kvaas.api.errors import error_responses
from kvaas.billing.budget import month_start
from kvaas.db.base import utcnow
from kvaas.db.models import UsageEvent
from kvaas.errors import AuthenticationError, BadRequest, PermissionDenied
from kvaas.metering.ledger import EVENT_METERS, STORAGE_CLASSES
from kvaas.metering.storage import bucket_bounds, epoch_s, integrate, load_segments

router = APIRouter(prefix="/v1", tags=["usage"])

MAX_BUCKETS = 2000
STEP = {"hour": 3600, "day": 86400}


class Meters(BaseModel):
    storage_token_seconds: dict[str, int] = Field(
        description="Tokens x seconds stored, per storage class (exact, per second)."
    )
    prefill_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    cache_creations: int = 0


class UsageBucket(Meters):
    start: datetime
    end: datetime


class UsageReport(BaseModel):
    object: Literal["usage"] = "usage"
    start: datetime = Field(serialization_alias="from")
    end: datetime = Field(serialization_alias="to")
    granularity: Literal["hour", "day"]
    totals: Meters
    buckets: list[UsageBucket]


class UsageEventOut(BaseModel):
    id: int
    meter: str
    quantity: int
    occurred_at: datetime
    cache_id: str | None
    details: dict[str, Any]


class UsageEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[UsageEventOut]
    has_more: bool


def _aware(at: datetime | None, default: datetime) -> datetime:
    if at is None:
        return default
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _range(frm: datetime | None, to: datetime | None) -> tuple[datetime, datetime]:
    now = utcnow()
    start = _aware(frm, month_start(now))
    # the meters count whole seconds: by default include the current one, so what a request
    # just recorded shows at once
    end = _aware(to, now.replace(microsecond=0) + timedelta(seconds=1))
    if end <= start:
        raise BadRequest("`to` must be after `from`", param="to")
    return start, end


@router.get(
    "/usage",
    summary="Running usage meters of the calling tenant",
    response_model_by_alias=True,
    responses=error_responses(AuthenticationError, PermissionDenied, BadRequest),
)
async def get_usage(
    auth: Auth,
    session: SessionDep,
    frm: Annotated[
        datetime | None, Query(alias="from", description="Start (default: month start, UTC).")
    ] = None,
    to: Annotated[
        datetime | None,
        Query(description="End, excluded (default: the end of the current second)."),
    ] = None,
    granularity: Annotated[Literal["hour", "day"], Query(description="Bucket size.")] = "day",
) -> UsageReport:
    start, end = _range(frm, to)
    step = STEP[granularity]
    bounds = bucket_bounds(epoch_s(start), epoch_s(end), step)
    if len(bounds) > MAX_BUCKETS:
        raise BadRequest(
            f"{len(bounds)} buckets; at most {MAX_BUCKETS}: shorten the range or use days",
            param="granularity",
        )
    tenant_id = auth.tenant.id
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
    buckets: list[UsageBucket] = []
    totals: dict[str, Any] = {
        "storage_token_seconds": dict.fromkeys(STORAGE_CLASSES, 0),
        **dict.fromkeys(EVENT_METERS, 0),
    }
    for (lo, hi), s in zip(bounds, sums, strict=True):
        storage = integrate(segments, lo, hi).token_seconds
        for cls, v in storage.items():
            totals["storage_token_seconds"][cls] += v
        for m, v in s.items():
            totals[m] += v
        buckets.append(
            UsageBucket(
                start=datetime.fromtimestamp(lo, UTC),
                end=datetime.fromtimestamp(hi, UTC),
                storage_token_seconds=storage,
                **s,
            )
        )
    return UsageReport(
        start=start, end=end, granularity=granularity, totals=Meters(**totals), buckets=buckets
    )


@router.get(
    "/usage/events",
    summary="Usage events of the calling tenant (the ledger behind invoice lines)",
    responses=error_responses(AuthenticationError, PermissionDenied, BadRequest),
)
async def list_usage_events(
    auth: Auth,
    session: SessionDep,
    meter: Annotated[str | None, Query(description="Only this meter.")] = None,
    frm: Annotated[datetime | None, Query(alias="from", description="Start (UTC).")] = None,
    to: Annotated[datetime | None, Query(description="End, excluded.")] = None,
    after: Annotated[int | None, Query(description="Only events with a larger id.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> UsageEventList:
    start = _aware(frm, datetime(1970, 1, 1, tzinfo=UTC))
    end = _aware(to, utcnow() + timedelta(days=1))
    q = select(UsageEvent).where(
        UsageEvent.tenant_id == auth.tenant.id,
        UsageEvent.occurred_at >= start,
        UsageEvent.occurred_at < end,
    )
    if meter is not None:
        if meter not in EVENT_METERS:
            raise BadRequest(f"unknown meter {meter!r}; one of {EVENT_METERS}", param="meter")
        q = q.where(UsageEvent.meter == meter)
    if after is not None:
        q = q.where(UsageEvent.id > after)
    rows = list(await session.scalars(q.order_by(UsageEvent.id).limit(limit + 1)))
    return UsageEventList(
        data=[
            UsageEventOut(
                id=r.id,
                meter=r.meter,
                quantity=r.quantity,
                occurred_at=r.occurred_at,
                cache_id=r.cache_id,
                details=r.details,
            )
            for r in rows[:limit]
        ],
        has_more=len(rows) > limit,
    )
