"""``/v1/invoices``: the calling tenant's invoices, as JSON and as PDF or HTML files."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from kvaas.api.deps import Auth, PriceBookDep, SessionDep, SettingsDep
from kvaas.api.errors import error_responses
from kvaas.api.schemas.invoices import InvoiceList, InvoiceOut
from kvaas.billing.invoices import invoice_file, load_lines, tenant_invoice, tenant_invoices
from kvaas.errors import AuthenticationError, NotFound, PermissionDenied

router = APIRouter(prefix="/v1", tags=["billing"])


@router.get(
    "/invoices",
    summary="List the calling tenant's invoices",
    responses=error_responses(AuthenticationError, PermissionDenied),
)
async def list_invoices(auth: Auth, session: SessionDep) -> InvoiceList:
    return InvoiceList(
        data=[InvoiceOut.of(inv) for inv in await tenant_invoices(session, auth.tenant.id)]
    )


@router.get(
    "/invoices/{invoice_id}.pdf",
    summary="Download an invoice as PDF",
    response_class=Response,
    responses={
        200: {"content": {"application/pdf": {}}, "description": "The invoice as PDF."},
        **error_responses(AuthenticationError, PermissionDenied, NotFound),
    },
)
async def get_invoice_pdf(
    invoice_id: str,
    auth: Auth,
    session: SessionDep,
    settings: SettingsDep,
    pricebook: PriceBookDep,
) -> Response:
    inv = await tenant_invoice(session, auth.tenant.id, invoice_id)
    return Response(
        await invoice_file(session, inv, "pdf", pricebook, settings.data_dir),
        media_type="application/pdf",
        headers={"Content-Disposition": f'inline; filename="{inv.id}.pdf"'},
    )


@router.get(
    "/invoices/{invoice_id}.html",
    summary="View an invoice as HTML",
    response_class=Response,
    responses={
        200: {"content": {"text/html": {}}, "description": "The invoice as HTML."},
        **error_responses(AuthenticationError, PermissionDenied, NotFound),
    },
)
async def get_invoice_html(
    invoice_id: str,
    auth: Auth,
    session: SessionDep,
    settings: SettingsDep,
    pricebook: PriceBookDep,
) -> Response:
    inv = await tenant_invoice(session, auth.tenant.id, invoice_id)
    return Response(
        await invoice_file(session, inv, "html", pricebook, settings.data_dir),
        media_type="text/html; charset=utf-8",
    )


@router.get(
    "/invoices/{invoice_id}",
    summary="Get an invoice with its lines",
    responses=error_responses(AuthenticationError, PermissionDenied, NotFound),
)
async def get_invoice(invoice_id: str, auth: Auth, session: SessionDep) -> InvoiceOut:
    inv = await tenant_invoice(session, auth.tenant.id, invoice_id)
    return InvoiceOut.of(inv, await load_lines(session, inv))
