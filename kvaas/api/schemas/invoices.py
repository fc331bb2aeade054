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
        """The line: each field is the stored line's attribute of that name."""
        return cls.model_validate(ln, from_attributes=True)


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
        """The invoice (each field the stored invoice's attribute of that name); with its
        ``lines`` when given (``None``: a listing, without them)."""
        out = cls.model_validate(inv, from_attributes=True)
        if lines is not None:
            out.lines = [InvoiceLineOut.of(ln) for ln in lines]
        return out


class InvoiceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[InvoiceOut]
