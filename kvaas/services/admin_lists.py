"""Read-only, paged listings for the operators' dashboard: tenants, caches across tenants,
invoices and the audit log.

Pages are cut with keyset cursors (:func:`kvaas.services.listing.encode_cursor`), never with
OFFSET, and totals are not counted. The global cache list reads one index:
``ix_caches_tenant_listed`` when a tenant is chosen (newest first, like the tenant's own
listing), else ``ix_caches_expires`` ``(status, expires_at)`` for one status, soonest expiry
first. Model, class and tier filters narrow those scans.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, literal_column, or_, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.db.models import (
    CACHE_STATUSES,
    LISTED_STATUSES,
    ApiKey,
    AuditLog,
    Cache,
    Invoice,
    InvoiceLine,
    StripeSync,
    Tenant,
)
from kvaas.errors import ValidationFailed
from kvaas.services.listing import Page, decode_cursor, encode_cursor

PAGE = 25
#: What an invoice shows as its state: issued (finalized), sent to Stripe (synced), paid.
INVOICE_STATES = ("finalized", "synced", "paid")


def invoice_state(inv: Invoice) -> str:
    if inv.payment_status == "paid":
        return "paid"
    return "synced" if inv.stripe_invoice_id else "finalized"


# --- tenants -------------------------------------------------------------------------------------
@dataclass
class TenantRow:
    tenant: Tenant
    live_caches: int
    tokens: int
    stored_bytes: int
    active_keys: int


async def tenants_page(
    session: AsyncSession, *, q: str = "", after: str | None = None, limit: int = PAGE
) -> tuple[list[TenantRow], str | None]:
    """Tenants whose name or id starts with ``q``, by name, with their live caches and keys."""
    stmt = select(Tenant)
    if q:
        like = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        stmt = stmt.where(or_(Tenant.name.like(like, escape="\\"), Tenant.id == q))
    if after:
        (name,) = decode_cursor(after, 1)
        stmt = stmt.where(Tenant.name > str(name))
    rows = list(await session.scalars(stmt.order_by(Tenant.name).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    ids = [t.id for t in rows]
    live: dict[str, tuple[int, int, int]] = {}
    keys: dict[str, int] = {}
    if ids:
        for tid, n, tokens, nbytes in await session.execute(
            select(
                Cache.tenant_id,
                func.count(),
                func.coalesce(func.sum(Cache.tokens), 0),
                func.coalesce(func.sum(Cache.stored_bytes), 0),
            )
            .where(Cache.tenant_id.in_(ids), _status_in(LISTED_STATUSES))
            .group_by(Cache.tenant_id)
        ):
            live[tid] = (int(n), int(tokens), int(nbytes))
        for tid, n in await session.execute(
            select(ApiKey.tenant_id, func.count())
            .where(ApiKey.tenant_id.in_(ids), ApiKey.revoked_at.is_(None))
            .group_by(ApiKey.tenant_id)
        ):
            keys[tid] = int(n)
    out = [TenantRow(t, *live.get(t.id, (0, 0, 0)), keys.get(t.id, 0)) for t in rows]
    return out, encode_cursor(rows[-1].name) if more else None


# --- caches ---------------------------------------------------------------------------------------
@dataclass
class CacheQuery:
    tenant_id: str | None = None
    model: str | None = None
    status: str = "ready"
    storage_class: str | None = None
    #: only caches whose storage class writes to this tier (``classes_in_tier``)
    classes_in_tier: Sequence[str] | None = None
    after: str | None = None
    limit: int = PAGE


def _status_in(statuses: Sequence[str]) -> Any:
    return Cache.status.in_([literal_column(f"'{s}'") for s in statuses])


async def caches_page(session: AsyncSession, f: CacheQuery) -> Page:
    """One page of caches of every tenant (or of ``f.tenant_id``) in ``f.status``."""
    if f.status not in CACHE_STATUSES:
        raise ValidationFailed(f"status must be one of {CACHE_STATUSES}", param="status")
    q = select(Cache, Tenant.name).join(Tenant, Tenant.id == Cache.tenant_id)
    if f.model:
        q = q.where(Cache.model == f.model)
    if f.storage_class:
        q = q.where(Cache.storage_class == f.storage_class)
    if f.classes_in_tier is not None:
        q = q.where(Cache.storage_class.in_(list(f.classes_in_tier)))
    if f.tenant_id:
        # the tenant's listing index; its statuses are literals so the partial index applies
        q = q.where(Cache.tenant_id == f.tenant_id)
        q = q.where(
            _status_in([f.status]) if f.status in LISTED_STATUSES else Cache.status == f.status
        )
        cols: tuple[Any, ...] = (Cache.created_at, Cache.id)
        desc = True
    else:
        q = q.where(Cache.status == f.status)
        cols = (Cache.expires_at, Cache.id)
        desc = False
    if f.after:
        at, cid = decode_cursor(f.after, 2)
        try:
            key = (datetime.fromisoformat(str(at)), str(cid))
        except ValueError:
            raise ValidationFailed("the cursor is not valid", param="after") from None
        q = q.where(tuple_(*cols) < key if desc else tuple_(*cols) > key)
    order = [c.desc() for c in cols] if desc else list(cols)
    rows = (await session.execute(q.order_by(*order).limit(f.limit + 1))).all()
    more = len(rows) > f.limit
    rows = rows[: f.limit]
    cursor = None
    if more:
        last: Cache = rows[-1][0]
        at_ = last.created_at if desc else last.expires_at
        cursor = encode_cursor(at_.isoformat(), last.id)
    return Page([(c, name) for c, name in rows], cursor)


async def models_in_use(session: AsyncSession) -> list[str]:
    """Models of the live caches (for the filter's choices)."""
    rows = await session.scalars(
        select(Cache.model).where(Cache.status == "ready").group_by(Cache.model).limit(50)
    )
    return sorted(rows)


# --- invoices -------------------------------------------------------------------------------------
async def periods(session: AsyncSession) -> list[str]:
    return list(
        await session.scalars(
            select(Invoice.period).group_by(Invoice.period).order_by(Invoice.period.desc())
        )
    )


async def invoices_page(
    session: AsyncSession,
    *,
    period: str | None = None,
    state: str | None = None,
    after: str | None = None,
    limit: int = PAGE,
) -> tuple[list[tuple[Invoice, str]], str | None]:
    """Invoices (newest period first, then by id) with their tenant's name; ``state`` one of
    :data:`INVOICE_STATES`."""
    q = select(Invoice, Tenant.name).join(Tenant, Tenant.id == Invoice.tenant_id)
    if period:
        q = q.where(Invoice.period == period)
    if state == "paid":
        q = q.where(Invoice.payment_status == "paid")
    elif state == "synced":
        q = q.where(Invoice.payment_status != "paid", Invoice.stripe_invoice_id.is_not(None))
    elif state == "finalized":
        q = q.where(Invoice.payment_status != "paid", Invoice.stripe_invoice_id.is_(None))
    elif state:
        raise ValidationFailed(f"state must be one of {INVOICE_STATES}", param="state")
    if after:
        p, iid = decode_cursor(after, 2)
        q = q.where(
            or_(Invoice.period < str(p), (Invoice.period == str(p)) & (Invoice.id > str(iid)))
        )
    rows = (
        await session.execute(q.order_by(Invoice.period.desc(), Invoice.id).limit(limit + 1))
    ).all()
    more = len(rows) > limit
    rows = rows[:limit]
    out = [(inv, name) for inv, name in rows]
    return out, encode_cursor(out[-1][0].period, out[-1][0].id) if more else None


async def invoice_detail(
    session: AsyncSession, invoice_id: str
) -> tuple[Invoice, list[InvoiceLine], list[StripeSync]] | None:
    inv = await session.get(Invoice, invoice_id)
    if inv is None:
        return None
    lines = list(
        await session.scalars(
            select(InvoiceLine)
            .where(InvoiceLine.invoice_id == inv.id)
            .order_by(InvoiceLine.position)
        )
    )
    synced = list(
        await session.scalars(
            select(StripeSync).where(StripeSync.local_ref == inv.id).order_by(StripeSync.id)
        )
    )
    return inv, lines, synced


# --- audit log ------------------------------------------------------------------------------------
async def audit_page(
    session: AsyncSession,
    *,
    tenant_id: str | None = None,
    action_prefix: str | None = None,
    before: int | None = None,
    limit: int = PAGE,
) -> tuple[list[AuditLog], int | None]:
    """Audit entries, newest first (by id); the next page starts below the returned id."""
    q = select(AuditLog)
    if tenant_id:
        q = q.where(AuditLog.tenant_id == tenant_id)
    if action_prefix:
        q = q.where(AuditLog.action.like(action_prefix + "%"))
    if before is not None:
        q = q.where(AuditLog.id < before)
    rows = list(await session.scalars(q.order_by(AuditLog.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, rows[-1].id if more else None
