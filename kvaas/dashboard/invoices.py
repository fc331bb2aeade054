"""Invoices: per period and state, an invoice's lines with its HTML and PDF, running the
invoicing of a closed month and sending a month to Stripe (with what failed).

Running and syncing call the billing services the CLI calls (:func:`run_invoices`,
:func:`sync_period`); each invoice is issued in its own transaction there, and the run's outcome
(or its error) is recorded in the audit log, where this page reads the last runs back.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response

from kvaas.api.deps import SessionDep
from kvaas.billing.invoices import invoice_file, period_of, run_invoices
from kvaas.billing.stripe_sync import StripeSyncError, make_client, sync_period
from kvaas.dashboard.auth import form_of
from kvaas.dashboard.deps import (
    Operator,
    actor,
    failed,
    notice_of,
    pricebook_of,
    redirect,
    settings_of,
)
from kvaas.dashboard.overview import MONEY_TTL, memo_of, money_compute
from kvaas.dashboard.render import page
from kvaas.db.models import Invoice, Tenant
from kvaas.db.repositories import AuditRepository
from kvaas.errors import APIError, NotFound, ServiceUnavailable
from kvaas.services import admin_lists

router = APIRouter(prefix="/admin/invoices", include_in_schema=False)


def last_closed_period(now: datetime) -> str:
    return period_of(now.replace(day=1) - timedelta(days=1))


@router.get("")
async def dashboard_invoices(request: Request, session: SessionDep, operator: Operator) -> Response:
    p = request.query_params
    period, state = p.get("period") or None, p.get("state") or None
    try:
        rows: list[tuple[Invoice, str]] = []
        cursor: str | None = None
        if state == "draft":  # drafts are not stored: only the open month's running amounts
            pass
        else:
            rows, cursor = await admin_lists.invoices_page(
                session, period=period, state=state, after=p.get("after") or None
            )
    except APIError as e:
        return await failed(request, session, operator, "Invoices", e, "/admin/invoices")
    runs, _ = await admin_lists.audit_page(session, action_prefix="invoices.", limit=10)
    # the open month: a draft per tenant with usage, its running amount (kept by the overview)
    current = period_of(datetime.now(UTC))
    drafts = None
    if state in (None, "draft") and period in (None, current):
        drafts = memo_of(request, "money", MONEY_TTL).peek(
            "all", money_compute(request.app.state.db, pricebook_of(request))
        )
    return page(
        request,
        "invoices.html",
        operator,
        section="invoices",
        rows=rows,
        cursor=cursor,
        period=period or "",
        state=state or "",
        periods=await admin_lists.periods(session),
        states=("draft", *admin_lists.INVOICE_STATES),
        drafts=drafts,
        show_drafts=state in (None, "draft") and period in (None, current),
        current=current,
        invoice_state=admin_lists.invoice_state,
        money=pricebook_of(request).format,
        default_period=last_closed_period(datetime.now(UTC)),
        stripe=make_client(settings_of(request)) is not None,
        runs=runs,
        notice=notice_of(request),
        query={k: v for k, v in p.items() if k != "after"},
    )


def _file_route(kind: Literal["pdf", "html"], media_type: str) -> None:
    async def dashboard_invoice_file(
        invoice_id: str, request: Request, session: SessionDep, operator: Operator
    ) -> Response:
        found = await admin_lists.invoice_detail(session, invoice_id)
        if found is None:
            e = NotFound(f"no invoice {invoice_id!r}", param="invoice_id")
            return await failed(request, session, operator, "Invoice", e, "/admin/invoices")
        data = await invoice_file(
            session, found[0], kind, pricebook_of(request), settings_of(request).data_dir
        )
        return Response(
            data,
            media_type=media_type,
            headers={
                "Content-Disposition": f'inline; filename="{invoice_id}.{kind}"',
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
            },
        )

    router.get(f"/{{invoice_id}}.{kind}", name=f"dashboard_invoice_{kind}")(dashboard_invoice_file)


_file_route("pdf", "application/pdf")
_file_route("html", "text/html; charset=utf-8")


@router.get("/drafts")
async def dashboard_invoice_drafts(request: Request, operator: Operator) -> Response:
    """The open month's drafts (waits for the first month-to-date computation)."""
    kept = await memo_of(request, "money", MONEY_TTL).get(
        "all", money_compute(request.app.state.db, pricebook_of(request))
    )
    return page(
        request, "_drafts.html", operator, drafts=kept, current=period_of(datetime.now(UTC))
    )


@router.get("/{invoice_id}")
async def dashboard_invoice(
    invoice_id: str, request: Request, session: SessionDep, operator: Operator
) -> Response:
    found = await admin_lists.invoice_detail(session, invoice_id)
    if found is None:
        e = NotFound(f"no invoice {invoice_id!r}", param="invoice_id")
        return await failed(request, session, operator, "Invoice", e, "/admin/invoices")
    inv, lines, synced = found
    return page(
        request,
        "invoice.html",
        operator,
        section="invoices",
        inv=inv,
        lines=lines,
        synced=synced,
        tenant=await session.get(Tenant, inv.tenant_id),
        state=admin_lists.invoice_state(inv),
        money=pricebook_of(request).format,
    )


async def _record(
    request: Request, session: SessionDep, action: str, period: str, details: dict[str, object]
) -> None:
    who = actor(request)
    await AuditRepository(session).record(
        actor=who.name,
        action=action,
        target_type="period",
        target_id=period,
        request_id=who.request_id,
        details=details,
    )
    await session.commit()


@router.post("/run")
async def dashboard_run_invoices(
    request: Request, session: SessionDep, operator: Operator
) -> Response:
    """Issue every tenant's invoice for a closed month (idempotent), then audit the outcome."""
    period = (await form_of(request)).get("period", "").strip()
    try:
        result = await run_invoices(
            session, period, pricebook_of(request), settings_of(request).data_dir
        )
    except APIError as e:
        return await failed(request, session, operator, "Run invoicing", e, "/admin/invoices")
    await _record(
        request,
        session,
        "invoices.run",
        period,
        {"created": result.created, "existing": len(result.existing), "empty": len(result.empty)},
    )
    return redirect("/admin/invoices", period=period, done="invoices-run")


@router.post("/sync")
async def dashboard_sync_invoices(
    request: Request, session: SessionDep, operator: Operator
) -> Response:
    """Send a month's invoices to Stripe; a failure is recorded (audit ``invoices.sync_failed``)
    and shown, and running it again resumes."""
    period = (await form_of(request)).get("period", "").strip()
    client = make_client(settings_of(request))
    try:
        if client is None:
            raise ServiceUnavailable("Stripe is not configured (KVAAS_STRIPE_API_KEY)")
        result = await sync_period(session, period, client)
    except StripeSyncError as e:
        await session.rollback()
        await _record(request, session, "invoices.sync_failed", period, {"error": str(e)[:500]})
        err = ServiceUnavailable(f"{e}; what was sent is recorded, run the sync again to resume")
        return await failed(request, session, operator, "Stripe sync", err, "/admin/invoices")
    except APIError as e:
        return await failed(request, session, operator, "Stripe sync", e, "/admin/invoices")
    await _record(
        request,
        session,
        "invoices.sync",
        period,
        {"synced": result.synced, "already": len(result.already), "skipped": len(result.skipped)},
    )
    return redirect("/admin/invoices", period=period, done="invoices-synced")
