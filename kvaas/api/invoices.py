"""``/v1/invoices``: the calling tenant's invoices, as JSON and as PDF or HTML files."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from fastapi.responses import Response

from kvaas.api.deps import Auth, PriceBookDep, SessionDep, SettingsDep, require_scope
from kvaas.api.errors import error_responses
from kvaas.api.schemas.invoices import InvoiceList, InvoiceOut
from kvaas.billing.invoices import invoice_file, load_lines, tenant_invoice, tenant_invoices
from kvaas.errors import AuthenticationError, NotFound, PermissionDenied

router = APIRouter(prefix="/v1", tags=["billing"])


@router.get(
    "/invoices",
    dependencies=[require_scope("invoices:read")],
    summary="List the calling tenant's invoices",
    responses=error_responses(AuthenticationError, PermissionDenied),
)
async def list_invoices(auth: Auth, session: SessionDep) -> InvoiceList:
    return InvoiceList(
        data=[InvoiceOut.of(inv) for inv in await tenant_invoices(session, auth.tenant.id)]
    )


def _invoice_file_route(
    kind: Literal["pdf", "html"], media_type: str, summary: str, *, named: bool
) -> None:
    """``GET /invoices/{invoice_id}.<kind>``: the invoice rendered as ``kind``, answered as
    ``media_type``; ``named``: with a ``Content-Disposition`` that names the file."""

    async def get_invoice_file(
        invoice_id: str,
        auth: Auth,
        session: SessionDep,
        settings: SettingsDep,
        pricebook: PriceBookDep,
    ) -> Response:
        inv = await tenant_invoice(session, auth.tenant.id, invoice_id)
        disposition = f'inline; filename="{inv.id}.{kind}"'
        return Response(
            await invoice_file(session, inv, kind, pricebook, settings.data_dir),
            media_type=media_type,
            headers={"Content-Disposition": disposition} if named else None,
        )

    content_type = media_type.split(";")[0]
    router.get(
        f"/invoices/{{invoice_id}}.{kind}",
        name=f"get_invoice_{kind}",
        dependencies=[require_scope("invoices:read")],
        summary=summary,
        response_class=Response,
        responses={
            200: {"content": {content_type: {}}, "description": f"The invoice as {kind.upper()}."},
            **error_responses(AuthenticationError, PermissionDenied, NotFound),
        },
    )(get_invoice_file)


_invoice_file_route("pdf", "application/pdf", "Download an invoice as PDF", named=True)
_invoice_file_route("html", "text/html; charset=utf-8", "View an invoice as HTML", named=False)


@router.get(
    "/invoices/{invoice_id}",
    dependencies=[require_scope("invoices:read")],
    summary="Get an invoice with its lines",
    responses=error_responses(AuthenticationError, PermissionDenied, NotFound),
)
async def get_invoice(invoice_id: str, auth: Auth, session: SessionDep) -> InvoiceOut:
    inv = await tenant_invoice(session, auth.tenant.id, invoice_id)
    return InvoiceOut.of(inv, await load_lines(session, inv))
