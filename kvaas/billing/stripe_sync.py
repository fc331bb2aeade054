"""Pushing invoices to Stripe, and Stripe's webhook events back. The only module that
imports ``stripe``.

For each issued invoice with a non-zero total: the tenant's customer, a draft invoice, one
invoice item per priced line (attached to that invoice), then finalization. Every request
carries a deterministic ``Idempotency-Key`` derived from the local object it mirrors, and every
success is recorded in ``stripe_sync`` (committed at once), so a sync that fails at any request
can simply be run again: recorded steps are skipped and the failed one is resent with the same
key, which Stripe answers with the original result instead of creating a duplicate. (Stripe
keeps idempotency keys for at least 24 hours: retry failed syncs within that window.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import stripe
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.billing.invoices import load_lines, parse_period
from kvaas.config import Settings
from kvaas.db.models import Invoice, StripeEvent, StripeSync, Tenant

#: Stripe invoice event type → the invoice's local payment status.
PAYMENT_STATUS = {
    "invoice.finalized": "open",
    "invoice.paid": "paid",
    "invoice.payment_succeeded": "paid",
    "invoice.payment_failed": "failed",
    "invoice.voided": "void",
    "invoice.marked_uncollectible": "uncollectible",
}


class StripeSyncError(Exception):
    """A request to Stripe failed; what succeeded before it is recorded. Run the sync again."""


class WebhookSignatureError(Exception):
    """The webhook payload's signature does not verify (or the payload is not an event)."""


def make_client(settings: Settings, *, max_network_retries: int = 2) -> stripe.StripeClient | None:
    """A Stripe client for the configured key, or None when no key is set (local only)."""
    if settings.stripe_api_key is None:
        return None
    kwargs: dict[str, Any] = {"max_network_retries": max_network_retries}
    if settings.stripe_api_base:
        kwargs["base_addresses"] = {"api": settings.stripe_api_base.rstrip("/")}
    return stripe.StripeClient(settings.stripe_api_key.get_secret_value(), **kwargs)


@dataclass
class SyncResult:
    period: str
    synced: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    requests: int = 0


class _Syncer:
    def __init__(
        self, session: AsyncSession, client: stripe.StripeClient, say: Callable[[str], None]
    ) -> None:
        self.session = session
        self.client = client
        self.say = say
        self.requests = 0

    async def _recorded(self, kind: str, local_ref: str) -> StripeSync | None:
        return await self.session.scalar(
            select(StripeSync).where(StripeSync.kind == kind, StripeSync.local_ref == local_ref)
        )

    async def _step(
        self,
        tenant_id: str,
        kind: str,
        local_ref: str,
        key: str,
        call: Callable[[stripe.RequestOptions], Any],
        params: dict[str, Any],
    ) -> str:
        """Do one idempotent request unless already recorded; record it; the Stripe id."""
        done = await self._recorded(kind, local_ref)
        if done is not None:
            return done.stripe_id
        self.requests += 1
        try:
            obj = await asyncio.to_thread(call, stripe.RequestOptions(idempotency_key=key))
        except stripe.StripeError as e:
            raise StripeSyncError(f"{kind} {local_ref}: {e.user_message or e}") from e
        self.session.add(
            StripeSync(
                idempotency_key=key,
                tenant_id=tenant_id,
                kind=kind,
                local_ref=local_ref,
                stripe_id=str(obj["id"]),
                request=params,
                at=datetime.now(UTC),
            )
        )
        try:
            await self.session.commit()
        except IntegrityError:  # a concurrent sync recorded it first: same object
            await self.session.rollback()
        return str(obj["id"])

    async def customer(self, tenant: Tenant) -> str:
        params = {"name": tenant.name, "metadata": {"kvaas_tenant_id": tenant.id}}
        return await self._step(
            tenant.id,
            "customer",
            tenant.id,
            f"kvaas-customer-{tenant.id}",
            lambda opts: self.client.v1.customers.create(params=params, options=opts),  # type: ignore[arg-type]
            params,
        )

    async def invoice(self, inv: Invoice, tenant: Tenant) -> None:
        customer = await self.customer(tenant)
        params: dict[str, Any] = {
            "customer": customer,
            "currency": inv.currency.lower(),
            "collection_method": "send_invoice",
            "days_until_due": 30,
            "auto_advance": False,
            "pending_invoice_items_behavior": "exclude",
            "description": f"KVaaS usage {inv.period}",
            "metadata": {"kvaas_invoice_id": inv.id, "period": inv.period},
        }
        stripe_invoice = await self._step(
            inv.tenant_id,
            "invoice",
            inv.id,
            f"kvaas-invoice-{inv.id}",
            lambda opts: self.client.v1.invoices.create(params=params, options=opts),  # type: ignore[arg-type]
            params,
        )
        if inv.stripe_invoice_id != stripe_invoice:
            inv.stripe_invoice_id = stripe_invoice
            await self.session.commit()
        for line in await load_lines(self.session, inv):
            if line.amount_minor <= 0:
                continue
            item: dict[str, Any] = {
                "customer": customer,
                "invoice": stripe_invoice,
                "amount": line.amount_minor,
                "currency": inv.currency.lower(),
                "description": f"{line.description}: {line.unit_quantity} x {line.unit}",
                "metadata": {
                    "kvaas_invoice_id": inv.id,
                    "line": str(line.position),
                    "meter": line.meter,
                },
            }
            await self._step(
                inv.tenant_id,
                "invoice_item",
                f"{inv.id}:{line.position}",
                f"kvaas-invoice-item-{inv.id}-{line.position}",
                lambda opts, item=item: self.client.v1.invoice_items.create(  # type: ignore[misc]
                    params=item,
                    options=opts,
                ),
                item,
            )
        await self._step(
            inv.tenant_id,
            "finalize",
            inv.id,
            f"kvaas-finalize-{inv.id}",
            lambda opts: self.client.v1.invoices.finalize_invoice(
                stripe_invoice, params={"auto_advance": True}, options=opts
            ),
            {"invoice": stripe_invoice},
        )


async def sync_period(
    session: AsyncSession,
    period: str,
    client: stripe.StripeClient,
    *,
    progress: Callable[[str], None] | None = None,
) -> SyncResult:
    """Push every issued invoice of ``period`` to Stripe (resumable and idempotent)."""
    parse_period(period)
    say = progress or (lambda _m: None)
    result = SyncResult(period)
    syncer = _Syncer(session, client, say)
    invoices = list(
        await session.scalars(
            select(Invoice).where(Invoice.period == period).order_by(Invoice.tenant_id)
        )
    )
    say(f"period {period}: {len(invoices)} invoices")
    for inv in invoices:
        if inv.total_minor <= 0:
            result.skipped.append(inv.id)
            say(f"{inv.id}: nothing to charge, not sent")
            continue
        if await syncer._recorded("finalize", inv.id) is not None:
            result.already.append(inv.id)
            say(f"{inv.id}: already in Stripe ({inv.stripe_invoice_id})")
            continue
        tenant = await session.get(Tenant, inv.tenant_id)
        assert tenant is not None
        await syncer.invoice(inv, tenant)
        result.synced.append(inv.id)
        say(f"{inv.id}: sent to Stripe as {inv.stripe_invoice_id}")
    result.requests = syncer.requests
    return result


# --- webhook -----------------------------------------------------------------------------------


def verify_event(payload: bytes, signature: str | None, secret: str) -> dict[str, Any]:
    """The event in ``payload`` if ``signature`` (the ``Stripe-Signature`` header) verifies."""
    if not signature:
        raise WebhookSignatureError("the Stripe-Signature header is missing")
    try:
        event = stripe.Webhook.construct_event(payload, signature, secret)
    except stripe.SignatureVerificationError as e:
        raise WebhookSignatureError(f"signature verification failed: {e.user_message or e}") from e
    except ValueError as e:
        raise WebhookSignatureError(f"the payload is not a Stripe event: {e}") from e
    return event.to_dict()


async def apply_event(session: AsyncSession, event: dict[str, Any]) -> str:
    """Record a verified event once and apply it to the invoice it names.

    Returns ``"duplicate"`` (seen before), ``"ignored"`` (not about a known invoice) or
    ``"applied"``. Out-of-order events never move an invoice's status backwards in time:
    an event older than the one last applied is recorded but not applied.
    """
    event_id = str(event.get("id", ""))
    etype = str(event.get("type", ""))
    created = datetime.fromtimestamp(int(event.get("created", 0)), UTC)
    if await session.get(StripeEvent, event_id) is not None:
        return "duplicate"
    obj = (event.get("data") or {}).get("object") or {}
    inv: Invoice | None = None
    if etype in PAYMENT_STATUS and obj.get("object") == "invoice":
        local_id = (obj.get("metadata") or {}).get("kvaas_invoice_id")
        if local_id:
            inv = await session.get(Invoice, local_id)
        if inv is None and obj.get("id"):
            inv = await session.scalar(
                select(Invoice).where(Invoice.stripe_invoice_id == str(obj["id"]))
            )
    session.add(
        StripeEvent(id=event_id, type=etype, created=created, invoice_id=inv.id if inv else None)
    )
    outcome = "ignored"
    if inv is not None and (inv.payment_event_at is None or created >= inv.payment_event_at):
        inv.payment_status = PAYMENT_STATUS[etype]
        inv.payment_event_at = created
        outcome = "applied"
    try:
        await session.commit()
    except IntegrityError:  # the same event delivered concurrently
        await session.rollback()
        return "duplicate"
    return outcome
