"""Invoices: priced from the ledger, idempotent, rendered to HTML and PDF, served per tenant."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pypdf import PdfReader
from sqlalchemy import select

from kvaas.billing.invoices import draft_invoice, parse_period, run_invoices
from kvaas.billing.pricebook import load_pricebook
from kvaas.db.models import Invoice, InvoiceLine
from kvaas.db.session import Database
from kvaas.errors import ValidationFailed

NOW = datetime(2026, 12, 2, tzinfo=UTC)


def _pdfs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.rglob("*.pdf")}


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)


async def _snapshot(db: Database) -> list[tuple]:
    async with db.session() as s:
        invs = (await s.scalars(select(Invoice).order_by(Invoice.id))).all()
        lines = (
            await s.scalars(
                select(InvoiceLine).order_by(InvoiceLine.invoice_id, InvoiceLine.position)
            )
        ).all()
        return [
            (i.id, i.tenant_id, i.period, i.total_minor, i.content_sha256, i.created_at)
            for i in invs
        ] + [
            (
                ln.invoice_id,
                ln.position,
                ln.meter,
                ln.quantity,
                ln.unit_price,
                ln.amount_minor,
                ln.usage_ref,
            )
            for ln in lines
        ]


async def test_running_twice_changes_nothing(
    db: Database, make_tenant, seed, tmp_path: Path
) -> None:
    pb = load_pricebook()
    a, b = await make_tenant("acme"), await make_tenant("globex")
    await seed(a.id, "cache_a")
    await seed(b.id, "cache_b")
    messages: list[str] = []
    async with db.session() as s:
        first = await run_invoices(s, "2026-10", pb, tmp_path, now=NOW, progress=messages.append)
    assert len(first.created) == 2 and not first.existing
    assert any("issued" in m for m in messages)
    before = await _snapshot(db)
    pdfs = _pdfs(tmp_path)
    assert len(pdfs) == 2
    async with db.session() as s:
        second = await run_invoices(s, "2026-10", pb, tmp_path, now=NOW)
    assert not second.created and sorted(second.existing) == sorted(first.created)
    assert await _snapshot(db) == before
    # files deleted on this node are rendered again, byte for byte
    for p in _pdfs(tmp_path):
        (tmp_path / "invoices" / a.id / p).unlink(missing_ok=True)
        (tmp_path / "invoices" / b.id / p).unlink(missing_ok=True)
    async with db.session() as s:
        await run_invoices(s, "2026-10", pb, tmp_path, now=NOW)
    assert _pdfs(tmp_path) == pdfs
    async with db.session() as s:  # no usage in November: no invoices
        nov = await run_invoices(s, "2026-11", pb, tmp_path, now=NOW)
    assert not nov.created


async def test_replaying_every_event_twice_gives_the_same_invoice(
    db: Database, make_tenant, seed, tmp_path: Path
) -> None:
    pb = load_pricebook()
    t = await make_tenant("acme")
    await seed(t.id)
    start, end = parse_period("2026-10")
    async with db.session() as s:
        once, _ = await draft_invoice(s, t.id, start, end, pb)
    await seed(t.id)  # every hook again: same idempotency keys
    async with db.session() as s:
        twice, _ = await draft_invoice(s, t.id, start, end, pb)
        result = await run_invoices(s, "2026-10", pb, tmp_path, now=NOW)
        inv = await s.get(Invoice, result.created[0])
    assert once.canonical() == twice.canonical()
    assert inv is not None and inv.content_sha256 == once.sha256()
    assert [ln.usage_ref for ln in once.lines] == [ln.usage_ref for ln in twice.lines]


async def test_lines_link_back_to_their_usage(db: Database, make_tenant, seed) -> None:
    pb = load_pricebook()
    t = await make_tenant("acme")
    await seed(t.id)
    async with db.session() as s:
        draft, _ = await draft_invoice(s, t.id, *parse_period("2026-10"), pb)
    by_meter = {ln.meter: ln for ln in draft.lines}
    assert by_meter["storage_token_seconds"].usage_ref["caches"] == {
        "cache_example": 100_000 * 3 * 3600
    }
    cached = by_meter["cached_tokens"].usage_ref
    assert cached["event_count"] == 20 and len(cached["event_ids"]) == 20
    # linked by their public ids, never by row numbers that count the platform's volume
    assert all(str(i).startswith("ue_") for i in cached["event_ids"])
    assert cached["query"].startswith("/v1/usage/events?meter=cached_tokens&from=2026-10-01")
    assert by_meter["prefill_tokens"].usage_ref["event_count"] == 21  # create + 20 suffixes


async def test_the_version_in_force_prices_the_period(db: Database, make_tenant) -> None:
    pb = load_pricebook()
    t = await make_tenant("acme")
    async with db.session() as s:
        sep, _ = await draft_invoice(s, t.id, *parse_period("2026-09"), pb)
        oct_, _ = await draft_invoice(s, t.id, *parse_period("2026-10"), pb)
    assert (sep.pricebook_version, oct_.pricebook_version) == ("2026-01", "2026-10")


async def test_open_period_is_refused(db: Database, tmp_path: Path) -> None:
    async with db.session() as s:
        with pytest.raises(ValidationFailed, match="not over yet"):
            await run_invoices(
                s, "2026-11", load_pricebook(), tmp_path, now=datetime(2026, 11, 20, tzinfo=UTC)
            )
        with pytest.raises(ValidationFailed, match="period must look like"):
            await run_invoices(s, "November", load_pricebook(), tmp_path, now=NOW)


async def test_invoice_api_pdf_and_tenant_scope(
    db: Database, make_keyed_tenant, seed, make_app, tmp_path: Path
) -> None:
    (t, key), (_o, other_key) = await make_keyed_tenant("acme"), await make_keyed_tenant("globex")
    await seed(t.id)
    async with make_app() as (app, client):
        async with db.session() as s:
            res = await run_invoices(
                s, "2026-10", app.state.pricebook, app.state.settings.data_dir, now=NOW
            )
        inv_id = res.created[0]
        auth = {"Authorization": f"Bearer {key}"}
        listing = (await client.get("/v1/invoices", headers=auth)).json()
        assert [i["id"] for i in listing["data"]] == [inv_id]
        r = await client.get(f"/v1/invoices/{inv_id}", headers=auth)
        assert r.status_code == 200
        body = r.json()
        assert body["total_minor"] == sum(ln["amount_minor"] for ln in body["lines"])
        pdf = await client.get(f"/v1/invoices/{inv_id}.pdf", headers=auth)
        assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
        text = "".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf.content)).pages)
        assert inv_id in text and "acme" in text
        assert f"{body['total_minor'] / 100:.2f} USD" in text
        assert "Storage, standard class" in text
        html = await client.get(f"/v1/invoices/{inv_id}.html", headers=auth)
        assert html.status_code == 200 and inv_id in html.text
        other = {"Authorization": f"Bearer {other_key}"}
        for path in (f"/v1/invoices/{inv_id}", f"/v1/invoices/{inv_id}.pdf"):
            miss = await client.get(path, headers=other)
            assert miss.status_code == 404
            assert miss.json()["error"]["type"] == "not_found_error"
        assert (await client.get("/v1/invoices", headers=other)).json()["data"] == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_cli_run_is_idempotent(db: Database, make_tenant, seed, tmp_path: Path) -> None:
    t = await make_tenant("acme")
    await seed(t.id)
    env = {
        **os.environ,
        "KVAAS_DATABASE_URL": db.url,
        "KVAAS_DATA_DIR": str(tmp_path / "cli"),
    }
    cmd = [sys.executable, "-m", "kvaas.cli", "invoices", "run", "--period", "2026-10"]
    first = await asyncio.to_thread(_run, cmd, env)
    assert first.returncode == 0, first.stderr
    assert "1 issued" in first.stdout and "issued inv_" in first.stderr
    second = await asyncio.to_thread(_run, cmd, env)
    assert second.returncode == 0 and "0 issued, 1 unchanged" in second.stdout
    bad = await asyncio.to_thread(_run, [*cmd[:-1], "2099-01"], env)
    assert bad.returncode == 2 and "not over yet" in bad.stderr
