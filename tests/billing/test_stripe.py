"""Stripe sync through the official SDK against a local stand-in: idempotent, resumable after a
failure at any request; webhook signatures and payment status."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kvtest.stripe_standin import StripeStandIn
from pydantic import SecretStr
from sqlalchemy import delete, select, update

from kvaas.billing.invoices import run_invoices
from kvaas.billing.pricebook import load_pricebook
from kvaas.billing.stripe_sync import StripeSyncError, make_client, sync_period
from kvaas.config import Settings
from kvaas.db.models import Invoice, InvoiceLine, StripeSync
from kvaas.db.session import Database

NOW = datetime(2026, 12, 2, tzinfo=UTC)
WEBHOOK_SECRET = "whsec_test_0123456789"


@pytest.fixture
def standin() -> Iterator[StripeStandIn]:
    s = StripeStandIn()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
async def invoiced(db: Database, make_tenant, seed, tmp_path: Path) -> AsyncIterator[list[str]]:
    """Two tenants' October invoices, 4 charged lines each."""
    a, b = await make_tenant("acme"), await make_tenant("globex")
    await seed(a.id, "cache_a")
    await seed(b.id, "cache_b")
    async with db.session() as s:
        res = await run_invoices(s, "2026-10", load_pricebook(), tmp_path, now=NOW)
    yield res.created


def _client(standin: StripeStandIn):  # type: ignore[no-untyped-def]
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        stripe_api_key=SecretStr("sk_test_standin"),
        stripe_api_base=standin.url,
    )
    client = make_client(settings, max_network_retries=0)
    assert client is not None
    return client


async def _charged_lines(db: Database) -> dict[str, int]:
    async with db.session() as s:
        rows = await s.scalars(select(InvoiceLine).where(InvoiceLine.amount_minor > 0))
        return {f"{ln.invoice_id}:{ln.position}": ln.amount_minor for ln in rows}


def _check_exactly_once(standin: StripeStandIn, lines: dict[str, int], tenants: int) -> None:
    assert len(standin.customers) == tenants
    assert len(standin.invoices) == tenants
    assert all(inv["status"] == "open" for inv in standin.invoices.values())
    per_line = Counter(
        f"{it['metadata']['kvaas_invoice_id']}:{it['metadata']['line']}"
        for it in standin.invoice_items.values()
    )
    assert per_line == Counter(dict.fromkeys(lines, 1))  # exactly one item per charged line
    for it in standin.invoice_items.values():
        key = f"{it['metadata']['kvaas_invoice_id']}:{it['metadata']['line']}"
        assert it["amount"] == lines[key] and it["currency"] == "usd"
    totals = {
        inv["metadata"]["kvaas_invoice_id"]: inv["total"] for inv in standin.invoices.values()
    }
    by_invoice: Counter[str] = Counter()
    for key, amount in lines.items():
        by_invoice[key.split(":")[0]] += amount
    assert totals == dict(by_invoice)


async def test_sync_sends_each_object_once(db: Database, invoiced: list[str], standin) -> None:
    lines = await _charged_lines(db)
    client = _client(standin)
    messages: list[str] = []
    async with db.session() as s:
        res = await sync_period(s, "2026-10", client, progress=messages.append)
    assert sorted(res.synced) == sorted(invoiced)
    _check_exactly_once(standin, lines, tenants=2)
    assert all(r.idempotency_key for r in standin.requests)
    n = len(standin.requests)
    assert n == res.requests == 2 * (3 + 4)  # customer, invoice, 4 items, finalize each
    async with db.session() as s:  # again: nothing is sent
        again = await sync_period(s, "2026-10", client)
        inv = await s.get(Invoice, invoiced[0])
    assert sorted(again.already) == sorted(invoiced) and len(standin.requests) == n
    assert inv is not None and inv.stripe_invoice_id in standin.invoices


@pytest.mark.parametrize("mode", ["500", "drop", "drop_after"])
async def test_retry_after_a_failure_at_any_request_never_duplicates(
    db: Database, invoiced: list[str], mode: str
) -> None:
    lines = await _charged_lines(db)
    total = 14  # requests of a clean sync
    for n in range(1, total + 1):
        async with db.session() as s:  # a fresh Stripe account each round
            await s.execute(delete(StripeSync))
            await s.execute(update(Invoice).values(stripe_invoice_id=None))
            await s.commit()
        standin = StripeStandIn(fail_at={n: mode})
        try:
            client = _client(standin)
            async with db.session() as s:
                with pytest.raises(StripeSyncError):
                    await sync_period(s, "2026-10", client)
            async with db.session() as s:
                res = await sync_period(s, "2026-10", client)
            assert res.synced and sorted(res.synced + res.already) == sorted(invoiced)
            _check_exactly_once(standin, lines, tenants=2)
            if mode == "drop_after":  # the lost answer is replayed, not redone
                assert any(r.outcome == "replayed" for r in standin.requests)
        finally:
            standin.close()


async def test_without_a_key_nothing_is_sent(db: Database) -> None:
    assert make_client(Settings(_env_file=None)) is None  # type: ignore[call-arg]


def _signed(payload: dict, secret: str = WEBHOOK_SECRET) -> tuple[bytes, str]:
    body = json.dumps(payload).encode()
    t = int(time.time())
    sig = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return body, f"t={t},v1={sig}"


def _event(event_id: str, etype: str, invoice_id: str, stripe_id: str, created: int) -> dict:
    return {
        "id": event_id,
        "object": "event",
        "type": etype,
        "created": created,
        "data": {
            "object": {
                "object": "invoice",
                "id": stripe_id,
                "metadata": {"kvaas_invoice_id": invoice_id},
            }
        },
    }


async def test_webhook_verifies_and_records_payment_once(
    db: Database, invoiced: list[str], make_app
) -> None:
    inv_id = invoiced[0]
    async with make_app(stripe_webhook_secret=WEBHOOK_SECRET) as (_app, client):
        paid = _event("evt_paid", "invoice.paid", inv_id, "in_1", 1_800_000_100)
        body, sig = _signed(paid)
        r = await client.post("/v1/stripe/webhook", content=body, headers={"Stripe-Signature": sig})
        assert r.status_code == 200 and r.json()["outcome"] == "applied"
        r = await client.post("/v1/stripe/webhook", content=body, headers={"Stripe-Signature": sig})
        assert r.json()["outcome"] == "duplicate"
        # an older event arriving late does not move the status back
        late = _event("evt_fail", "invoice.payment_failed", inv_id, "in_1", 1_800_000_000)
        body2, sig2 = _signed(late)
        r = await client.post(
            "/v1/stripe/webhook", content=body2, headers={"Stripe-Signature": sig2}
        )
        assert r.json()["outcome"] == "ignored"
        # bad signatures
        forged, _ = _signed(_event("evt_x", "invoice.voided", inv_id, "in_1", 1_900_000_000))
        _, wrong = _signed(paid, secret="whsec_other")
        for sig_header in (wrong, "t=1,v1=00", "garbage"):
            r = await client.post(
                "/v1/stripe/webhook", content=forged, headers={"Stripe-Signature": sig_header}
            )
            assert r.status_code == 400
            assert r.json()["error"]["type"] == "invalid_request_error"
        r = await client.post("/v1/stripe/webhook", content=forged)
        assert r.status_code == 401
    async with db.session() as s:
        inv = await s.get(Invoice, inv_id)
    assert inv is not None and inv.payment_status == "paid"


async def test_webhook_without_a_secret_is_refused(db: Database, make_app) -> None:
    async with make_app() as (_app, client):
        r = await client.post("/v1/stripe/webhook", content=b"{}")
        assert r.status_code == 403
