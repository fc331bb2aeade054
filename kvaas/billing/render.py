"""Rendering an invoice to HTML (Jinja2 template ``billing/templates/invoice.html.j2``) and
PDF (ReportLab). Both are deterministic: the same invoice renders to the same bytes."""

from __future__ import annotations

import io
from typing import Any

import jinja2
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

from kvaas.billing.pricebook import billing_dir, from_minor
from kvaas.db.models import Invoice, InvoiceLine


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(billing_dir() / "templates")),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
    )


def _money(invoice: Invoice, minor_units: int) -> Any:
    def money(minor: int) -> str:
        return f"{from_minor(minor, minor_units):,} {invoice.currency}"

    return money


def render_html(
    invoice: Invoice, lines: list[InvoiceLine], tenant_name: str, minor_units: int
) -> str:
    template = _env().get_template("invoice.html.j2")
    return template.render(
        invoice=invoice,
        lines=lines,
        tenant_name=tenant_name,
        money=_money(invoice, minor_units),
    )


def render_pdf(
    invoice: Invoice, lines: list[InvoiceLine], tenant_name: str, minor_units: int
) -> bytes:
    money = _money(invoice, minor_units)
    buf = io.BytesIO()
    doc = SimpleDocTemplate(
        buf,
        pagesize=A4,
        title=f"Invoice {invoice.id}",
        author="KVaaS",
        invariant=1,
        leftMargin=15 * mm,
        rightMargin=15 * mm,
    )
    styles = getSampleStyleSheet()
    small = styles["BodyText"].clone("small", fontSize=8, leading=10)
    story: list[Any] = [
        Paragraph(f"Invoice {invoice.id}", styles["Title"]),
        Paragraph(f"Tenant: {tenant_name} ({invoice.tenant_id})", styles["BodyText"]),
        Paragraph(
            f"Period {invoice.period}: {invoice.period_start:%Y-%m-%d} to "
            f"{invoice.period_end:%Y-%m-%d} (UTC, end excluded)",
            styles["BodyText"],
        ),
        Paragraph(
            f"Price book version {invoice.pricebook_version}, currency {invoice.currency}",
            styles["BodyText"],
        ),
        Spacer(1, 6 * mm),
    ]
    data: list[list[Any]] = [["#", "Item", "Billed", "Unit", "Unit price", "Amount"]]
    for line in lines:
        data.append(
            [
                str(line.position),
                Paragraph(f"{line.description}<br/>({line.meter})", small),
                line.unit_quantity,
                line.unit,
                line.unit_price,
                money(line.amount_minor),
            ]
        )
    data.append(["", "Total", "", "", "", money(invoice.total_minor)])
    table = Table(data, colWidths=[8 * mm, 62 * mm, 30 * mm, 28 * mm, 22 * mm, 30 * mm])
    table.setStyle(
        TableStyle(
            [
                ("FONTNAME", (0, 0), (-1, 0), "Helvetica-Bold"),
                ("FONTNAME", (0, -1), (-1, -1), "Helvetica-Bold"),
                ("LINEBELOW", (0, 0), (-1, 0), 0.8, colors.black),
                ("LINEABOVE", (0, -1), (-1, -1), 0.8, colors.black),
                ("ALIGN", (2, 1), (-1, -1), "RIGHT"),
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("FONTSIZE", (0, 0), (-1, -1), 8),
            ]
        )
    )
    story += [
        table,
        Spacer(1, 6 * mm),
        Paragraph(
            "Each line is rounded once, half up, to the minor unit; the total is the sum of "
            "the rounded lines.",
            small,
        ),
    ]
    doc.build(story)
    return buf.getvalue()
