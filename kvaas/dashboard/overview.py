"""The overview: does caching pay? What is stored, how often it is hit, what it saves and
earns; charts of storage per tier and attaches per hour (their data from ``charts.json``).

What is stored (one grouped scan of the cache rows), times to first token and tier fill are
read on each request. The attach statistics, the month's revenue and the chart data are
aggregates over usage events and the cache lifecycle: they come from :class:`Memo` (at most a
minute or two old, recomputed in the background; before the first result the page loads them
as fragments)."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import select

from kvaas.api.deps import SessionDep
from kvaas.billing.pricebook import PriceBook
from kvaas.codec.sizing import read_kv_shape
from kvaas.dashboard.deps import Operator, pricebook_of, service_of, settings_of
from kvaas.dashboard.economics import seconds_per_prefill_token, ttft_stats
from kvaas.dashboard.memo import Compute, Kept, Memo
from kvaas.dashboard.render import SECURITY_HEADERS, page
from kvaas.db.models import Tenant
from kvaas.db.session import Database
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


#: How long an aggregate is served before it is recomputed (in the background).
ECONOMICS_TTL = 60.0
MONEY_TTL = 120.0


def memo_of(request: Request, name: str, ttl: float) -> Memo:
    memos: dict[str, Memo] | None = getattr(request.app.state, "dashboard_memos", None)
    if memos is None:
        memos = request.app.state.dashboard_memos = {}
    if name not in memos:
        memos[name] = Memo(ttl)
    return memos[name]


async def _names(db: Database, ids: set[str]) -> dict[str, str]:
    if not ids:
        return {}
    async with db.session() as s:
        rows = await s.execute(select(Tenant.id, Tenant.name).where(Tenant.id.in_(ids)))
        return {tid: name for tid, name in rows}


def _economics(db: Database) -> Compute:
    async def compute() -> dict[str, Any]:
        async with db.session() as s:
            stats = await admin_views.attach_stats(s, datetime.now(UTC), days=DAYS)
            by_model = await admin_views.attach_by_model(s, stats.since, stats.until)
        top = stats.by_tenant[:10]
        first = stats.daily[0] if stats.daily else None
        last = stats.daily[-1] if stats.daily else None
        trend = (
            (admin_views.rate(first[1], first[2]), admin_views.rate(last[1], last[2]))
            if first and last
            else (None, None)
        )
        return {
            "stats": stats,
            "top": top,
            "by_model": by_model,
            "trend": trend,
            "names": await _names(db, {t for t, *_ in top}),
        }

    return compute


def _of_budget(spend: int, budget: int | None, book: PriceBook) -> str:
    """``"40.0 % of 250.00 USD"``, or ``"no budget"``."""
    if budget is None:
        return "no budget"
    if budget == 0:
        return f"budget {book.format(0)}"
    return f"{100 * spend / budget:.1f} % of {book.format(budget)}"


def money_compute(db: Database, book: PriceBook) -> Compute:
    """Month-to-date revenue, in total and per tenant (kept under ``money``)."""

    async def compute() -> dict[str, Any]:
        now = datetime.now(UTC)
        async with db.session() as s:
            total, per = await admin_views.revenue_month_to_date(s, book, now)
            budgets = await admin_views.budgets(s, list(per))
        ranked = sorted(per.items(), key=lambda kv: -kv[1])
        every = [
            (tid, book.format(minor), _of_budget(minor, budgets.get(tid), book))
            for tid, minor in ranked
        ]
        return {
            "period": f"{now.year:04d}-{now.month:02d}",
            "revenue": book.format(total),
            "spend": every[:10],
            "every": every,  # the open month's draft amounts, for the invoices page
            "names": await _names(db, set(per)),
        }

    return compute


def _economics_context(request: Request, kept: Kept | None) -> dict[str, Any]:
    cold, warm = ttft_stats("create"), ttft_stats("attach")
    per_token = seconds_per_prefill_token(cold)
    saved = None
    if kept is not None and per_token is not None:
        saved = kept.value["stats"].cached_tokens * per_token
    return {
        "eco": kept,
        "cold": cold,
        "warm": warm,
        "saved_seconds": saved,
        "days": DAYS,
        "rate": admin_views.rate,
    }


@router.get("")
async def dashboard_overview(request: Request, session: SessionDep, operator: Operator) -> Response:
    now = datetime.now(UTC)
    db: Database = request.app.state.db
    inv = await admin_views.inventory(session, now)
    eco = memo_of(request, "economics", ECONOMICS_TTL).peek("all", _economics(db))
    money = memo_of(request, "money", MONEY_TTL).peek(
        "all", money_compute(db, pricebook_of(request))
    )
    return page(
        request,
        "overview.html",
        operator,
        section="overview",
        inv=inv,
        by_class=inv.by_class(),
        ratio=admin_views.compression_ratio(inv.stored, _raw_bytes_per_token(request)),
        money=money,
        tiers=await tier_usage(request),
        **_economics_context(request, eco),
    )


@router.get("/overview/economics")
async def dashboard_overview_economics(request: Request, operator: Operator) -> Response:
    """The attach statistics fragment (waits for the first result)."""
    kept = await memo_of(request, "economics", ECONOMICS_TTL).get(
        "all", _economics(request.app.state.db)
    )
    return page(request, "_economics.html", operator, **_economics_context(request, kept))


@router.get("/overview/money")
async def dashboard_overview_money(request: Request, operator: Operator) -> Response:
    """The revenue fragment (waits for the first result)."""
    kept = await memo_of(request, "money", MONEY_TTL).get(
        "all", money_compute(request.app.state.db, pricebook_of(request))
    )
    return page(request, "_money.html", operator, money=kept)


def chart_payload(
    storage: list[tuple[datetime, dict[str, int]]], hourly: list[tuple[datetime, int, int, int]]
) -> dict[str, Any]:
    """The overview charts' data: bytes per tier over time, attaches (and hit rate) per hour."""
    held_any = {t for _, held in storage for t, n in held.items() if n}
    tiers = sorted(held_any or {t for _, held in storage for t in held})
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


def _charts(db: Database) -> Compute:
    async def compute() -> dict[str, Any]:
        now = datetime.now(UTC)
        async with db.session() as s:
            storage = await admin_views.storage_over_time(s, now, hours=48)
            stats = await admin_views.attach_stats(s, now, days=2, by_tenant=False)
        return chart_payload(storage, stats.hourly)

    return compute


@router.get("/overview/charts.json")
async def dashboard_overview_charts(request: Request, operator: Operator) -> Response:
    kept = await memo_of(request, "charts", ECONOMICS_TTL).get("all", _charts(request.app.state.db))
    data = {**kept.value, "computed_at": kept.computed_at.isoformat(timespec="seconds")}
    return JSONResponse(data, headers=SECURITY_HEADERS)
