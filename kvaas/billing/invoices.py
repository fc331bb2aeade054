"""Invoices: one per tenant and calendar month (UTC), priced from the meters.

:func:`run_invoices` is idempotent: an invoice, once issued, is never changed, so running it
again for the same period changes nothing (it only re-renders missing files). Invoice ids are
derived from (tenant, period), so the same usage gives the same invoice on any replica.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.billing.pricebook import PriceBook
from kvaas.billing.pricing import PricedLine, price_usage
from kvaas.billing.render import render_html, render_pdf
from kvaas.db.base import utcnow
from kvaas.db.models import Invoice, InvoiceLine, Tenant
from kvaas.errors import NotFound, ValidationFailed
from kvaas.metering.storage import Usage, event_ids, meter_usage, tenants_with_activity

#: At most this many event ids are listed on a line; the line's query finds them all.
MAX_LINKED_EVENTS = 1000


def parse_period(period: str) -> tuple[datetime, datetime]:
    """``"2026-11"`` → ``[2026-11-01T00:00Z, 2026-12-01T00:00Z)``."""
    try:
        year, month = (int(x) for x in period.split("-"))
        start = datetime(year, month, 1, tzinfo=UTC)
    except (ValueError, TypeError) as e:
        raise ValidationFailed(
            f"period must look like 2026-11, got {period!r}", param="period"
        ) from e
    end = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=UTC)
    return start, end


def period_of(at: datetime) -> str:
    return f"{at.year:04d}-{at.month:02d}"


def invoice_id(tenant_id: str, period: str) -> str:
    return "inv_" + hashlib.sha256(f"{tenant_id}:{period}".encode()).hexdigest()[:24]


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _link_usage(
    session: AsyncSession, tenant_id: str, usage: Usage, line: PricedLine
) -> dict[str, Any]:
    frm, to = _iso(usage.start), _iso(usage.end)
    if line.meter == "storage_token_seconds":
        cls_ = line.storage_class
        caches = {cid: ts for (cid, cls), ts in sorted(usage.per_cache.items()) if cls == cls_}
        return {
            "from": frm,
            "to": to,
            "caches": caches,
            "query": f"/v1/usage?from={frm}&to={to}",
        }
    if line.meter == "minimum_charge":
        return {"from": frm, "to": to, **line.usage_ref}
    ids = await event_ids(
        session, tenant_id, line.meter, usage.start, usage.end, MAX_LINKED_EVENTS + 1
    )
    return {
        "from": frm,
        "to": to,
        "meter": line.meter,
        "event_ids": ids[:MAX_LINKED_EVENTS],
        "event_count": len(ids) if len(ids) <= MAX_LINKED_EVENTS else None,
        "query": f"/v1/usage/events?meter={line.meter}&from={frm}&to={to}",
    }


@dataclass
class Draft:
    """A priced invoice before it is stored."""

    tenant_id: str
    period: str
    start: datetime
    end: datetime
    pricebook_version: str
    currency: str
    lines: list[PricedLine] = field(default_factory=list)

    @property
    def total_minor(self) -> int:
        return sum(line.amount_minor for line in self.lines)

    def canonical(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "period": self.period,
            "pricebook_version": self.pricebook_version,
            "currency": self.currency,
            "lines": [
                {
                    "meter": ln.meter,
                    "storage_class": ln.storage_class,
                    "usage_quantity": ln.usage_quantity,
                    "free_quantity": ln.free_quantity,
                    "quantity": ln.quantity,
                    "unit_price": str(ln.unit_price),
                    "amount_minor": ln.amount_minor,
                }
                for ln in self.lines
            ],
            "total_minor": self.total_minor,
        }

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.canonical(), sort_keys=True).encode()).hexdigest()


async def draft_invoice(
    session: AsyncSession,
    tenant_id: str,
    start: datetime,
    end: datetime,
    pricebook: PriceBook,
    *,
    period: str | None = None,
    link_usage: bool = True,
) -> tuple[Draft, Usage]:
    """Price the tenant's usage in ``[start, end)`` with the version in force at ``start``;
    ``link_usage`` adds each line's reference to the usage behind it."""
    prices = pricebook.version_for(start)
    usage = await meter_usage(session, tenant_id, start, end)
    lines = price_usage(usage, prices, pricebook.minor_units)
    for line in lines if link_usage else []:
        line.usage_ref = await _link_usage(session, tenant_id, usage, line)
    draft = Draft(
        tenant_id, period or period_of(start), start, end, prices.version, pricebook.currency, lines
    )
    return draft, usage


@dataclass
class RunResult:
    period: str
    created: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)


def invoice_dir(data_dir: Path, tenant_id: str) -> Path:
    return data_dir / "invoices" / tenant_id


async def load_lines(session: AsyncSession, inv: Invoice) -> list[InvoiceLine]:
    return list(
        await session.scalars(
            select(InvoiceLine)
            .where(InvoiceLine.invoice_id == inv.id)
            .order_by(InvoiceLine.position)
        )
    )


def _files_present(inv: Invoice) -> bool:
    return bool(
        inv.html_path
        and inv.pdf_path
        and Path(inv.html_path).is_file()
        and Path(inv.pdf_path).is_file()
    )


def _write_atomically(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(content)
        tmp.replace(folder / name)


async def write_files(
    session: AsyncSession, inv: Invoice, pricebook: PriceBook, data_dir: Path
) -> None:
    """Render the invoice to ``<data_dir>/invoices/<tenant>/<id>.html|.pdf`` (atomically)."""
    lines = await load_lines(session, inv)
    tenant = await session.get(Tenant, inv.tenant_id)
    name = tenant.name if tenant else inv.tenant_id
    folder = invoice_dir(data_dir, inv.tenant_id)
    files = {
        f"{inv.id}.html": render_html(inv, lines, name, pricebook.minor_units).encode(),
        f"{inv.id}.pdf": render_pdf(inv, lines, name, pricebook.minor_units),
    }
    await asyncio.to_thread(_write_atomically, folder, files)
    inv.html_path = str(folder / f"{inv.id}.html")
    inv.pdf_path = str(folder / f"{inv.id}.pdf")


async def tenant_invoices(session: AsyncSession, tenant_id: str) -> Sequence[Invoice]:
    """The tenant's invoices, newest period first."""
    rows = await session.scalars(
        select(Invoice).where(Invoice.tenant_id == tenant_id).order_by(Invoice.period.desc())
    )
    return rows.all()


async def tenant_invoice(session: AsyncSession, tenant_id: str, invoice_id: str) -> Invoice:
    """The tenant's invoice ``invoice_id``; 404 when there is none (or it is another's)."""
    inv = await session.get(Invoice, invoice_id)
    if inv is None or inv.tenant_id != tenant_id:
        raise NotFound(f"no invoice with id {invoice_id!r}", param="invoice_id")
    return inv


def _read(path: str | None) -> bytes | None:
    if path and Path(path).is_file():
        return Path(path).read_bytes()
    return None


async def invoice_file(
    session: AsyncSession,
    inv: Invoice,
    kind: Literal["pdf", "html"],
    pricebook: PriceBook,
    data_dir: Path,
) -> bytes:
    """The stored rendering of ``inv``; rendered again (stored and committed) when this node
    lacks the file."""

    def path() -> str | None:
        return inv.pdf_path if kind == "pdf" else inv.html_path

    data = await asyncio.to_thread(_read, path())
    if data is None:
        await write_files(session, inv, pricebook, data_dir)
        await session.commit()
        data = await asyncio.to_thread(_read, path())
    assert data is not None
    return data


async def issue_invoice(session: AsyncSession, draft: Draft) -> Invoice | None:
    """Store ``draft`` as an issued invoice and commit; None when it already exists."""
    inv = Invoice(
        id=invoice_id(draft.tenant_id, draft.period),
        tenant_id=draft.tenant_id,
        period=draft.period,
        period_start=draft.start,
        period_end=draft.end,
        currency=draft.currency,
        pricebook_version=draft.pricebook_version,
        subtotal_minor=draft.total_minor,
        total_minor=draft.total_minor,
        content_sha256=draft.sha256(),
        status="issued",
        payment_status="unpaid",
        created_at=utcnow(),
    )
    session.add(inv)
    for i, ln in enumerate(draft.lines, start=1):
        session.add(
            InvoiceLine(
                invoice_id=inv.id,
                position=i,
                meter=ln.meter,
                storage_class=ln.storage_class,
                description=ln.description,
                usage_quantity=ln.usage_quantity,
                free_quantity=ln.free_quantity,
                quantity=ln.quantity,
                unit=ln.unit,
                unit_quantity=str(ln.unit_quantity.normalize() if ln.quantity else 0),
                unit_price=str(ln.unit_price),
                amount_minor=ln.amount_minor,
                usage_ref=ln.usage_ref,
            )
        )
    try:
        await session.commit()
    except IntegrityError:  # a concurrent run issued it first
        await session.rollback()
        return None
    return inv


async def run_invoices(
    session: AsyncSession,
    period: str,
    pricebook: PriceBook,
    data_dir: Path,
    *,
    now: datetime | None = None,
    progress: Callable[[str], None] | None = None,
) -> RunResult:
    """Issue every tenant's invoice for ``period`` (a closed calendar month)."""
    start, end = parse_period(period)
    now = now or utcnow()
    if end > now:
        raise ValidationFailed(
            f"period {period} is not over yet (it ends {_iso(end)}); invoices are issued for "
            "closed periods only",
            param="period",
        )
    say = progress or (lambda _msg: None)
    result = RunResult(period)
    tenants = await tenants_with_activity(session, start, end)
    say(f"period {period}: {len(tenants)} tenants with usage")
    for n, tenant_id in enumerate(tenants, start=1):
        iid = invoice_id(tenant_id, period)
        inv = await session.get(Invoice, iid)
        if inv is None:
            draft, _usage = await draft_invoice(session, tenant_id, start, end, pricebook)
            if not draft.lines:
                result.empty.append(tenant_id)
                say(f"[{n}/{len(tenants)}] {tenant_id}: no billable usage")
                continue
            inv = await issue_invoice(session, draft)
            if inv is None:
                inv = await session.get(Invoice, iid)
                assert inv is not None
                result.existing.append(iid)
            else:
                result.created.append(iid)
                say(
                    f"[{n}/{len(tenants)}] {tenant_id}: issued {iid} "
                    f"({len(draft.lines)} lines, {pricebook.format(inv.total_minor)})"
                )
        else:
            result.existing.append(iid)
            say(f"[{n}/{len(tenants)}] {tenant_id}: {iid} already issued, unchanged")
        if not await asyncio.to_thread(_files_present, inv):
            await write_files(session, inv, pricebook, data_dir)
            await session.commit()
    return result
