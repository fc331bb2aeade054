"""Bodies of the ``/v1/invoices`` routes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from kvaas.db.models import Invoice, InvoiceLine


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

    @classmethod
    def of(cls, ln: InvoiceLine) -> InvoiceLineOut:
        return cls(
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

    @classmethod
    def of(cls, inv: Invoice, lines: Sequence[InvoiceLine] | None = None) -> InvoiceOut:
        """The invoice; with its ``lines`` when given (``None``: a listing, without them)."""
        return cls(
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
            lines=None if lines is None else [InvoiceLineOut.of(ln) for ln in lines],
        )


class InvoiceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[InvoiceOut]
