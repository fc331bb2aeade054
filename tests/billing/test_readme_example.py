"""The billing page's worked example (``docs/billing.md``) is computed by the billing code:
this test recomputes it and checks the page shows exactly these numbers."""

from __future__ import annotations

from pathlib import Path

from kvaas.billing.estimate import economics
from kvaas.billing.invoices import draft_invoice, parse_period
from kvaas.billing.pricebook import from_minor, load_pricebook
from kvaas.db.session import Database

PAGE = Path(__file__).parents[2] / "docs" / "billing.md"
START, END = "<!-- billing-example:start -->", "<!-- billing-example:end -->"


async def example_markdown(db: Database, tenant_id: str) -> str:
    pb = load_pricebook()
    async with db.session() as s:
        draft, _ = await draft_invoice(s, tenant_id, *parse_period("2026-10"), pb)
    rows = [
        "| # | Line | Usage | Free | Billed | Unit price | Amount |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for i, ln in enumerate(draft.lines, start=1):
        billed = ln.unit_quantity.normalize() if ln.quantity else 0
        rows.append(
            f"| {i} | {ln.description} (`{ln.meter}`) | {ln.usage_quantity:,} | "
            f"{ln.free_quantity:,} | {billed:f} x {ln.unit} | {ln.unit_price} | "
            f"{from_minor(ln.amount_minor, pb.minor_units)} |"
        )
    rows.append(f"| | **Total** | | | | | **{from_minor(draft.total_minor, 2)} {pb.currency}** |")
    prices = pb.version_for(draft.start)
    e = economics(100_000, 100_000, 3 * 3600, "standard", prices)
    rows += [
        "",
        f"Break-even against re-sending the prompt (price book {prices.version}, marginal "
        f"prices): creating costs {e.create:f} and 3 hours of storage {e.storage_for_ttl:f}; "
        f"each attach reads the prefix for {e.attach:f} instead of {e.resend:f} to prefill it "
        f"again, so the cache pays off from attach **{e.break_even_attaches}** on. With 20 "
        f"attaches the prefix costs {e.with_cache(20):f} cached against "
        f"{e.without_cache(20):f} re-sent.",
    ]
    return "\n".join(rows)


async def test_billing_page_shows_the_computed_example(db: Database, make_tenant, seed) -> None:
    t = await make_tenant("acme")
    await seed(t.id)
    expected = await example_markdown(db, t.id)
    text = PAGE.read_text()
    assert START in text and END in text, "docs/billing.md lacks the billing example markers"
    shown = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert shown == expected, f"docs/billing.md example is stale; it should read:\n{expected}"
