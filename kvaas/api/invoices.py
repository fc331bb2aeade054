"""``/v1/invoices``: the calling tenant's invoices, as JSON and as PDF or HTML files."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from sqlalchemy import select

from kvaas.api.deps import Auth, SessionDep
from kvaas.api.errors import error_responses
from kvaas.billing.invoices import load_lines, write_files
from kvaas.billing.pricebook import PriceBook
from kvaas.db.models import Invoice
from kvaas.errors import AuthenticationError, NotFound, PermissionDenied

router = APIRouter(prefix="/v1", tags=["billing"])


class InvoiceLineOut(BaseModel):
    position: int
    meter: str
    storage_class: str | None
    description: str
    usage_quantity: int = Field(description="Metered quantity in meter units.")
    free_quantity: int = Field(description="Part of it covered by the free tier.")
    quantity: int = Field(description="Billed quantity in meter units.")
    unit: str
    unit_quantity: str = Field(description="Billed quantity in the price's unit (decimal).")
    unit_price: str = Field(description="Price per unit (decimal, invoice currency).")
    amount_minor: int = Field(description="Line amount, rounded half up, in minor units.")
    usage_ref: dict[str, Any] = Field(description="The usage behind this line.")


class InvoiceOut(BaseModel):
    object: Literal["invoice"] = "invoice"
    id: str
    period: str
    period_start: datetime
    period_end: datetime
    currency: str
    pricebook_version: str
    total_minor: int
    status: str
    payment_status: str
    stripe_invoice_id: str | None
    created_at: datetime
    lines: list[InvoiceLineOut] | None = None


class InvoiceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[InvoiceOut]


def _out(inv: Invoice, lines: list[Any] | None = None) -> InvoiceOut:
    return InvoiceOut(
        id=inv.id,
        period=inv.period,
        period_start=inv.period_start,
        period_end=inv.period_end,
        currency=inv.currency,
        pricebook_version=inv.pricebook_version,
        total_minor=inv.total_minor,
        status=inv.status,
        payment_status=inv.payment_status,
        stripe_invoice_id=inv.stripe_invoice_id,
        created_at=inv.created_at,
        lines=None
        if lines is None
        else [
            InvoiceLineOut(
                position=ln.position,
                meter=ln.meter,
                storage_class=ln.storage_class,
                description=ln.description,
                usage_quantity=ln.usage_quantity,
                free_quantity=ln.free_quantity,
                quantity=ln.quantity,
                unit=ln.unit,
                unit_quantity=ln.unit_quantity,
                unit_price=ln.unit_price,
                amount_minor=ln.amount_minor,
                usage_ref=ln.usage_ref,
            )
            for ln in lines
        ],
    )


async def _own(session: SessionDep, auth: Auth, invoice_id: str) -> Invoice:
    inv = await session.get(Invoice, invoice_id)
    if inv is None or inv.tenant_id != auth.tenant.id:
        raise NotFound(f"no invoice with id {invoice_id!r}", param="invoice_id")
    return inv


def _read(path: str | None) -> bytes | None:
    if path and Path(path).is_file():
        return Path(path).read_bytes()
    return None


async def _file(request: Request, session: SessionDep, inv: Invoice, suffix: str) -> bytes:
    """The stored rendering; rendered again (and stored) when this node lacks the file."""
    path = inv.pdf_path if suffix == "pdf" else inv.html_path
    data = await asyncio.to_thread(_read, path)
    if data is None:
        pricebook: PriceBook = request.app.state.pricebook
        await write_files(session, inv, pricebook, request.app.state.settings.data_dir)
        await session.commit()
        data = await asyncio.to_thread(_read, inv.pdf_path if suffix == "pdf" else inv.html_path)
    assert data is not None
    return data


@router.get(
    "/invoices",
    summary="List the calling tenant's invoices",
    responses=error_responses(AuthenticationError, PermissionDenied),
)
async def list_invoices(auth: Auth, session: SessionDep) -> InvoiceList:
    rows = await session.scalars(
        select(Invoice).where(Invoice.tenant_id == auth.tenant.id).order_by(Invoice.period.desc())
    )
    return InvoiceList(data=[_out(inv) for inv in rows])


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
    invoice_id: str, auth: Auth, session: SessionDep, request: Request
) -> Response:
    inv = await _own(session, auth, invoice_id)
    return Response(
        await _file(request, session, inv, "pdf"),
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
    invoice_id: str, auth: Auth, session: SessionDep, request: Request
) -> Response:
    inv = await _own(session, auth, invoice_id)
    return Response(
        await _file(request, session, inv, "html"), media_type="text/html; charset=utf-8"
    )


@router.get(
    "/invoices/{invoice_id}",
    summary="Get an invoice with its lines",
    responses=error_responses(AuthenticationError, PermissionDenied, NotFound),
)
async def get_invoice(invoice_id: str, auth: Auth, session: SessionDep) -> InvoiceOut:
    inv = await _own(session, auth, invoice_id)
    return _out(inv, await load_lines(session, inv))
