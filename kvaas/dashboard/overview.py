"""The overview: does caching pay? What is stored, how often it is hit, what it saves and
earns; charts of storage per tier and attaches per hour (their data from ``charts.json``)."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import select

from kvaas.api.deps import SessionDep
from kvaas.codec.sizing import read_kv_shape
from kvaas.dashboard.deps import Operator, pricebook_of, service_of, settings_of
from kvaas.dashboard.economics import seconds_per_prefill_token, ttft_stats
from kvaas.dashboard.render import SECURITY_HEADERS, page
from kvaas.db.models import Tenant
from kvaas.services import admin_views
from kvaas.store.errors import StoreError

router = APIRouter(prefix="/admin", include_in_schema=False)

#: The trend and the per-tenant table cover this many days.
DAYS = 14


def _raw_bytes_per_token(request: Request) -> dict[str, int]:
    """Uncompressed KV bytes per token of the served model (by its name), when readable."""
    service = service_of(request)
    engine = service.engine if service is not None else None
    if engine is None:
        return {}
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        shape = read_kv_shape(engine.model.path, settings_of(request).engine_dtype)
        return {engine.model.name: shape.bytes_per_token}
    return {}


async def tier_usage(request: Request) -> dict[str, tuple[int, int | None]]:
    """Bytes held and capacity per tier of this gateway's store (the engine worker's memory
    tier is not among them); empty without a store."""
    service = service_of(request)
    if service is None:
        return {}
    store = service.store
    try:
        used = await asyncio.wait_for(store.usage(), 3.0)
    except (TimeoutError, StoreError):
        used = {}
    return {t.name: (used.get(t.name, -1), t.capacity) for t in store.tiers}


@router.get("")
async def dashboard_overview(request: Request, session: SessionDep, operator: Operator) -> Response:
    now = datetime.now(UTC)
    inv = await admin_views.inventory(session, now)
    stats = await admin_views.attach_stats(session, now, days=DAYS)
    revenue, per_tenant = await admin_views.revenue_month_to_date(
        session, pricebook_of(request), now
    )
    cold, warm = ttft_stats("create"), ttft_stats("attach")
    per_token = seconds_per_prefill_token(cold)
    names: dict[str, str] = {}
    top = stats.by_tenant[:10]
    ids = {t for t, *_ in top} | set(per_tenant)
    if ids:
        rows = await session.execute(select(Tenant.id, Tenant.name).where(Tenant.id.in_(ids)))
        names = {tid: name for tid, name in rows}
    first_day = stats.daily[0] if stats.daily else None
    last_day = stats.daily[-1] if stats.daily else None
    return page(
        request,
        "overview.html",
        operator,
        section="overview",
        inv=inv,
        by_class=inv.by_class(),
        ratio=admin_views.compression_ratio(inv.stored, _raw_bytes_per_token(request)),
        stats=stats,
        days=DAYS,
        rate=admin_views.rate,
        trend=(
            (
                admin_views.rate(first_day[1], first_day[2]),
                admin_views.rate(last_day[1], last_day[2]),
            )
            if first_day and last_day
            else (None, None)
        ),
        cold=cold,
        warm=warm,
        saved_seconds=stats.cached_tokens * per_token if per_token is not None else None,
        revenue=pricebook_of(request).format(revenue),
        spend=sorted(per_tenant.items(), key=lambda kv: -kv[1])[:10],
        money=pricebook_of(request).format,
        top=top,
        names=names,
        tiers=await tier_usage(request),
    )


def chart_payload(
    storage: list[tuple[datetime, dict[str, int]]], hourly: list[tuple[datetime, int, int, int]]
) -> dict[str, Any]:
    """The overview charts' data: bytes per tier over time, attaches (and hit rate) per hour."""
    tiers = sorted({t for _, held in storage for t in held})
    return {
        "storage": {
            "labels": [at.strftime("%m-%d %H:%M") for at, _ in storage],
            "series": {t: [held.get(t, 0) for _, held in storage] for t in tiers},
        },
        "attaches": {
            "labels": [at.strftime("%m-%d %H:00") for at, *_ in hourly],
            "attaches": [n for *_, n in hourly],
            "hit_rate": [
                round(100 * r, 1) if (r := admin_views.rate(c, p)) is not None else None
                for _, c, p, _n in hourly
            ],
        },
    }


@router.get("/overview/charts.json")
async def dashboard_overview_charts(
    request: Request, session: SessionDep, operator: Operator
) -> Response:
    now = datetime.now(UTC)
    storage = await admin_views.storage_over_time(session, now, hours=48)
    stats = await admin_views.attach_stats(session, now, days=2, by_tenant=False)
    return JSONResponse(chart_payload(storage, stats.hourly), headers=SECURITY_HEADERS)
