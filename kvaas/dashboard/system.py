"""System: component health (refreshed in place), tier capacity and fill, the engine and its
queue, recent errors and the audit log of admin actions."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import Response

from kvaas.api.deps import SessionDep
from kvaas.dashboard.deps import Operator, service_of, settings_of
from kvaas.dashboard.overview import tier_usage
from kvaas.dashboard.render import page
from kvaas.services import admin_lists

router = APIRouter(prefix="/admin/system", include_in_schema=False)
PROBE_TIMEOUT_SECONDS = 3.0


@dataclass
class Component:
    name: str
    ok: bool
    detail: str
    latency_ms: float


async def _probe(name: str, check: object) -> Component:
    t0 = time.perf_counter()
    try:
        detail = await asyncio.wait_for(check(), PROBE_TIMEOUT_SECONDS)  # type: ignore[operator]
        ok = True
    except TimeoutError:
        ok, detail = False, f"no answer within {PROBE_TIMEOUT_SECONDS:g} s"
    except Exception as e:  # a probe's failure is what this page reports
        ok = False
        text = getattr(e, "detail", None) or str(e) or type(e).__name__
        detail = text.splitlines()[0][:300]
    return Component(name, ok, str(detail or ""), round((time.perf_counter() - t0) * 1000, 1))


async def components(request: Request) -> list[Component]:
    """Every readiness probe of the application (database, Redis, store, engine), run now."""
    checks = getattr(request.app.state, "health_checks", None) or {}
    if not checks and getattr(request.app.state, "db", None) is not None:
        db = request.app.state.db

        async def db_probe() -> str:
            await db.ping()
            return str(db.dialect)

        checks = {"database": db_probe}
    return list(await asyncio.gather(*(_probe(n, c) for n, c in sorted(checks.items()))))


@router.get("/health")
async def dashboard_health(request: Request, operator: Operator) -> Response:
    """The health table alone (the system page refreshes it in place)."""
    return page(request, "_health.html", operator, components=await components(request))


@router.get("")
async def dashboard_system(request: Request, session: SessionDep, operator: Operator) -> Response:
    p = request.query_params
    before = p.get("before")
    audit, next_before = await admin_lists.audit_page(
        session,
        before=int(before) if before and before.isdigit() else None,
        action_prefix=p.get("action") or None,
    )
    errors, _ = await admin_lists.audit_page(
        session, action_prefix="cache.prefill_failed", limit=10
    )
    sync_errors, _ = await admin_lists.audit_page(
        session, action_prefix="invoices.sync_failed", limit=5
    )
    service = service_of(request)
    engine = service.engine if service is not None else None
    settings = settings_of(request)
    gate = service.gate if service is not None else None
    return page(
        request,
        "system.html",
        operator,
        section="system",
        components=await components(request),
        tiers=await tier_usage(request),
        engine=engine,
        engine_kind=settings.engine,
        engine_urls=settings.engine_urls,
        gate=gate,
        errors=errors,
        sync_errors=sync_errors,
        audit=audit,
        next_before=next_before,
        action=p.get("action") or "",
    )
