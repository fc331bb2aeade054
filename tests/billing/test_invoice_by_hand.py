"""One invoice worked out by hand from ``billing/pricebook.yaml`` (version ``2026-10``), so the
billing code is checked against numbers it did not compute itself.

Prices of version 2026-10 (per 1M tokens, storage per 1M token-hours): hot 4.50, standard
1.00, prefill 1.00, cached reads 0.10 with 1,000,000 cached tokens free, output 2.00, cache
creations 0 (no line), minimum storage charge 0.01 per cache.

Usage in October 2026:

- cache A: 250,000 tokens in ``standard`` for 3 h (10:00-13:00 on the 5th); created with a
  250,000-token prefill, then attached 5 times (each: 250,000 cached tokens, an 800-token
  prefill, 12,500 output tokens);
- cache B: 1,000 tokens in ``hot`` for 36 s; created with a 1,000-token prefill.

By hand (amounts exact, each line then rounded once, half up, to cents)::

    storage hot   1,000 x 36 s = 36,000 token-s = 0.00001 Mtok-h   x 4.50 = 0.000045  ->  0
    storage std   250,000 x 10,800 s = 2.7e9 token-s = 0.75 Mtok-h x 1.00 = 0.75      -> 75
    prefill       250,000 + 1,000 + 5 x 800 = 255,000 tokens       x 1.00 = 0.255     -> 26
    cached        5 x 250,000 = 1,250,000, less 1,000,000 free     x 0.10 = 0.025     ->  3
    output        5 x 12,500 = 62,500 tokens                       x 2.00 = 0.125     -> 13
    minimum       cache B stored for 0.000045 < 0.01: 0.01 - 0.000045 = 0.009955    ->  1

Total 118 cents. Three lines end in exactly half a cent (0.255, 0.025, 0.125): rounding half
down, to even or by truncation would give 25, 2 and 12 there.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import select

from kvaas.billing.invoices import draft_invoice, invoice_id, parse_period, run_invoices
from kvaas.billing.pricebook import load_pricebook
from kvaas.db.models import Cache, Invoice, InvoiceLine
from kvaas.db.session import Database
from kvaas.metering import hooks

PRICEBOOK = Path(__file__).resolve().parents[2] / "billing" / "pricebook.yaml"
START = datetime(2026, 10, 5, 10, 0, tzinfo=UTC)

#: (meter, storage class, usage, free, billed quantity, unit price, exact amount, cents)
EXPECTED = [
    ("storage_token_seconds", "hot", 36_000, 0, 36_000, "4.50", "0.000045", 0),
    ("storage_token_seconds", "standard", 2_700_000_000, 0, 2_700_000_000, "1.00", "0.75", 75),
    ("prefill_tokens", None, 255_000, 0, 255_000, "1.00", "0.255", 26),
    ("cached_tokens", None, 1_250_000, 1_000_000, 250_000, "0.10", "0.025", 3),
    ("output_tokens", None, 62_500, 0, 62_500, "2.00", "0.125", 13),
    ("minimum_charge", None, 1, 0, 1, "0.01", "0.009955", 1),
]
TOTAL_CENTS = 118


async def _record_usage(db: Database, cache_obj: Callable[..., Cache], tenant_id: str) -> None:
    a = cache_obj(tenant_id, "cache_hand_a", 250_000, "standard")
    b = cache_obj(tenant_id, "cache_hand_b", 1_000, "hot")
    async with db.session() as s:
        await hooks.on_create(s, a, 250_000, "req_hand_create_a", START)
        await hooks.on_cache_ready(s, a, START)
        await hooks.on_create(s, b, 1_000, "req_hand_create_b", START)
        await hooks.on_cache_ready(s, b, START)
        await hooks.on_cache_ended(s, b, "deleted", START + timedelta(seconds=36))
        await s.commit()
    for i in range(5):
        async with db.session() as s:
            await hooks.on_attach(
                s,
                a,
                cached_tokens=250_000,
                prefill_tokens=800,
                output_tokens=12_500,
                request_id=f"req_hand_attach_{i}",
                at=START + timedelta(minutes=10 + i),
            )
            await s.commit()
    async with db.session() as s:
        await hooks.on_cache_ended(s, a, "deleted", START + timedelta(hours=3))
        await s.commit()


async def test_invoice_matches_the_hand_computed_lines(
    db: Database, make_tenant: Any, cache_obj: Callable[..., Cache], tmp_path: Path
) -> None:
    pb = load_pricebook(PRICEBOOK)
    tenant = await make_tenant("by-hand")
    await _record_usage(db, cache_obj, tenant.id)
    start, end = parse_period("2026-10")

    async with db.session() as s:
        draft, _usage = await draft_invoice(s, tenant.id, start, end, pb, link_usage=False)
    assert draft.pricebook_version == "2026-10" and draft.currency == "USD"
    got = [
        (ln.meter, ln.storage_class, ln.usage_quantity, ln.free_quantity, ln.quantity,
         ln.unit_price, ln.amount, ln.amount_minor)
        for ln in draft.lines
    ]  # fmt: skip
    want = [(*row[:5], Decimal(row[5]), Decimal(row[6]), row[7]) for row in EXPECTED]
    assert got == want
    assert draft.total_minor == TOTAL_CENTS

    # the issued invoice stores the same lines and total
    async with db.session() as s:
        now = datetime(2026, 11, 2, tzinfo=UTC)
        result = await run_invoices(s, "2026-10", pb, tmp_path, now=now)
    assert result.created == [invoice_id(tenant.id, "2026-10")]
    async with db.session() as s:
        inv = await s.get(Invoice, result.created[0])
        assert inv is not None
        assert inv.total_minor == inv.subtotal_minor == TOTAL_CENTS
        lines = (
            await s.scalars(
                select(InvoiceLine)
                .where(InvoiceLine.invoice_id == inv.id)
                .order_by(InvoiceLine.position)
            )
        ).all()
    assert [(ln.meter, ln.storage_class, ln.quantity, ln.amount_minor) for ln in lines] == [
        (meter, cls, qty, cents) for meter, cls, _u, _f, qty, _p, _a, cents in EXPECTED
    ]
    assert pb.format(inv.total_minor) == "1.18 USD"
