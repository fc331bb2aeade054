"""``/v1/usage``: the calling tenant's running meters, bucketed by hour or day, and the usage
events behind them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from kvaas.api.deps import Auth, SessionDep, require_scope
from kvaas.api.errors import error_responses
from kvaas.api.schemas.usage import Meters, UsageBucket, UsageEventList, UsageEventOut, UsageReport
from kvaas.errors import AuthenticationError, BadRequest, PermissionDenied
from kvaas.services import usage_reports

router = APIRouter(prefix="/v1", tags=["usage"])


@router.get(
    "/usage",
    dependencies=[require_scope("usage:read")],
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
    report = await usage_reports.usage_report(session, auth.tenant.id, frm, to, granularity)
    return UsageReport(
        start=report.start,
        end=report.end,
        granularity=report.granularity,
        totals=Meters(
            storage_token_seconds=report.totals.storage_token_seconds, **report.totals.events
        ),
        buckets=[
            UsageBucket(
                start=b.start, end=b.end, storage_token_seconds=b.storage_token_seconds, **b.events
            )
            for b in report.buckets
        ],
    )


@router.get(
    "/usage/events",
    dependencies=[require_scope("usage:read")],
    summary="Usage events of the calling tenant (the ledger behind invoice lines)",
    responses=error_responses(AuthenticationError, PermissionDenied, BadRequest),
)
async def list_usage_events(
    auth: Auth,
    session: SessionDep,
    meter: Annotated[str | None, Query(description="Only this meter.")] = None,
    frm: Annotated[datetime | None, Query(alias="from", description="Start (UTC).")] = None,
    to: Annotated[datetime | None, Query(description="End, excluded.")] = None,
    after: Annotated[
        str | None,
        Query(max_length=32, description="Only events recorded after this one (its `id`)."),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> UsageEventList:
    rows, has_more = await usage_reports.usage_events(
        session, auth.tenant.id, meter=meter, frm=frm, to=to, after=after, limit=limit
    )
    return UsageEventList(
        data=[
            UsageEventOut(
                id=r.public_id,
                meter=r.meter,
                quantity=r.quantity,
                occurred_at=r.occurred_at,
                cache_id=r.cache_id,
                details=r.details,
            )
            for r in rows
        ],
        has_more=has_more,
    )
