"""Operator tasks in the dashboard (no browser): each goes through the admin services and is
in the audit log exactly when it took effect."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from kvtest.dashboard import Dash, seed_attach, seed_cache
from kvtest.gateway import admin_headers
from sqlalchemy import select

from kvaas.db.models import AuditLog, Budget, Cache, Tenant


async def _audit(dash: Dash, action: str) -> list[AuditLog]:
    async with dash.db.session() as s:
        return list(await s.scalars(select(AuditLog).where(AuditLog.action == action)))


async def _keys(dash: Dash, tenant_id: str) -> list[dict[str, object]]:
    r = await dash.client.get(f"/admin/api/tenants/{tenant_id}/keys", headers=admin_headers())
    return list(r.json()["data"])


async def _tenant(dash: Dash, name: str) -> Tenant:
    async with dash.db.session() as s:
        t = (await s.scalars(select(Tenant).where(Tenant.name == name))).one()
        return t


async def test_create_a_tenant_and_keys_the_secret_shown_once(dash: Dash) -> None:
    await dash.login()
    r = await dash.post("/admin/tenants", {"name": "acme"})
    assert r.status_code == 200
    secret = re.search(r'id="new-secret">([^<]+)<', r.text)
    assert secret, r.text
    me = await dash.client.get("/v1/me", headers={"Authorization": f"Bearer {secret.group(1)}"})
    assert me.status_code == 200 and me.json()["tenant_name"] == "acme"
    [entry] = await _audit(dash, "tenant.create")
    assert entry.actor == "admin-dashboard"
    t = await _tenant(dash, "acme")
    page = await dash.client.get(f"/admin/tenants/{t.id}")
    assert secret.group(1) not in page.text  # once only
    # the tenant's cache scope: the slot its chunk keys and manifests are filed under
    slot = re.search(r"namespace slot <code>([0-9a-f]+)</code>", page.text)
    assert slot and slot.group(1) not in t.namespace_secret

    r = await dash.post(
        f"/admin/tenants/{t.id}/keys", {"name": "ci", "scopes": "caches:read usage:read"}
    )
    second = re.search(r'id="new-secret">([^<]+)<', r.text)
    assert second and second.group(1) != secret.group(1)
    keys = (
        await dash.client.get(f"/admin/api/tenants/{t.id}/keys", headers=admin_headers())
    ).json()
    ci = next(k for k in keys["data"] if k["name"] == "ci")
    assert ci["scopes"] == ["caches:read", "usage:read"]

    # a duplicate name is refused with the service's message, nothing created
    r = await dash.post("/admin/tenants", {"name": "acme"})
    assert r.status_code == 409 and "already exists" in r.text
    assert len(await _audit(dash, "tenant.create")) == 1


async def test_revoke_a_key(dash: Dash) -> None:
    await dash.login()
    r = await dash.post("/admin/tenants", {"name": "acme"})
    secret = re.search(r'id="new-secret">([^<]+)<', r.text)
    assert secret
    t = await _tenant(dash, "acme")
    keys = (
        await dash.client.get(f"/admin/api/tenants/{t.id}/keys", headers=admin_headers())
    ).json()
    key_id = keys["data"][0]["id"]
    r = await dash.post(f"/admin/tenants/{t.id}/keys/{key_id}/revoke", {})
    assert r.status_code == 303 and "done=key-revoked" in r.headers["location"]
    me = await dash.client.get("/v1/me", headers={"Authorization": f"Bearer {secret.group(1)}"})
    assert me.status_code == 401
    assert len(await _audit(dash, "key.revoke")) == 1
    # another tenant's key cannot be revoked through this tenant's page
    await dash.post("/admin/tenants", {"name": "other"})
    o = await _tenant(dash, "other")
    okeys = (
        await dash.client.get(f"/admin/api/tenants/{o.id}/keys", headers=admin_headers())
    ).json()
    r = await dash.post(f"/admin/tenants/{t.id}/keys/{okeys['data'][0]['id']}/revoke", {})
    assert r.status_code == 422
    assert len(await _audit(dash, "key.revoke")) == 1


async def test_limits_and_budget_are_saved_and_audited(dash: Dash) -> None:
    await dash.login()
    await dash.post("/admin/tenants", {"name": "acme"})
    t = await _tenant(dash, "acme")
    r = await dash.post(
        f"/admin/tenants/{t.id}/limits",
        {"max_caches": "12", "storage_quota_tokens": "1,000,000", "storage_quota_bytes": ""},
    )
    assert r.status_code == 303
    t = await _tenant(dash, "acme")
    assert (t.max_caches, t.storage_quota_tokens, t.storage_quota_bytes) == (12, 1_000_000, None)
    [entry] = await _audit(dash, "tenant.limits")
    assert entry.details["after"]["max_caches"] == 12

    r = await dash.post(f"/admin/tenants/{t.id}/limits", {"max_caches": "-1"})
    assert r.status_code == 422
    r = await dash.post(f"/admin/tenants/{t.id}/limits", {"max_caches": "lots"})
    assert r.status_code == 422
    assert len(await _audit(dash, "tenant.limits")) == 1

    r = await dash.post(f"/admin/tenants/{t.id}/budget", {"amount": "250.50"})
    assert r.status_code == 303
    async with dash.db.session() as s:
        budget = await s.get(Budget, t.id)
        assert budget is not None and budget.amount_minor == 25050
    [entry] = await _audit(dash, "budget.set")
    assert entry.details == {"before_minor": None, "after_minor": 25050}
    for bad in ("-5", "NaN", "ten"):
        r = await dash.post(f"/admin/tenants/{t.id}/budget", {"amount": bad})
        assert r.status_code == 422, bad
    assert len(await _audit(dash, "budget.set")) == 1
    page = await dash.client.get(f"/admin/tenants/{t.id}")
    assert "250.50" in page.text


async def test_disable_and_enable_after_a_confirmation(dash: Dash) -> None:
    await dash.login()
    r = await dash.post("/admin/tenants", {"name": "acme"})
    secret = re.search(r'id="new-secret">([^<]+)<', r.text)
    assert secret
    t = await _tenant(dash, "acme")
    confirm = await dash.client.get(f"/admin/tenants/{t.id}/confirm/disable")
    assert confirm.status_code == 200 and "Disable tenant acme?" in confirm.text
    r = await dash.post(f"/admin/tenants/{t.id}/disable", {}, page=f"/admin/tenants/{t.id}")
    assert r.status_code == 303
    me = await dash.client.get("/v1/me", headers={"Authorization": f"Bearer {secret.group(1)}"})
    assert me.status_code == 403
    r = await dash.post(f"/admin/tenants/{t.id}/enable", {})
    me = await dash.client.get("/v1/me", headers={"Authorization": f"Bearer {secret.group(1)}"})
    assert me.status_code == 200
    assert [len(await _audit(dash, a)) for a in ("tenant.disable", "tenant.enable")] == [1, 1]
    assert (await dash.post(f"/admin/tenants/{t.id}/delete", {})).status_code == 422


async def test_change_a_caches_ttl_and_delete_it(dash: Dash) -> None:
    await dash.login()
    await dash.post("/admin/tenants", {"name": "acme"})
    t = await _tenant(dash, "acme")
    cid = await seed_cache(dash.db, t.id, name="contract")
    page = await dash.client.get(f"/admin/caches/{cid}")
    assert page.status_code == 200 and "contract" in page.text

    r = await dash.post(f"/admin/caches/{cid}/ttl", {"ttl_seconds": "7200"})
    assert r.status_code == 303
    async with dash.db.session() as s:
        c = await s.get(Cache, cid)
        assert c is not None and c.ttl_seconds == 7200
        assert c.expires_at > datetime.now(UTC) + timedelta(seconds=7000)
    [entry] = await _audit(dash, "cache.ttl")
    assert (entry.target_type, entry.target_id, entry.tenant_id) == ("cache", cid, t.id)

    # a lifetime out of bounds changes nothing, and leaves no audit entry behind
    r = await dash.post(f"/admin/caches/{cid}/ttl", {"ttl_seconds": "1"})
    assert r.status_code == 400 and "ttl_seconds" in r.text
    assert len(await _audit(dash, "cache.ttl")) == 1

    confirm = await dash.client.get(f"/admin/caches/{cid}/delete")
    assert "cannot be undone" in confirm.text
    r = await dash.post(f"/admin/caches/{cid}/delete", {})
    assert r.status_code == 303
    async with dash.db.session() as s:
        c = await s.get(Cache, cid)
        assert c is not None and c.status == "deleted"
    assert len(await _audit(dash, "cache.delete")) == 1
    # a deleted cache takes no more actions, and none is audited
    r = await dash.post(f"/admin/caches/{cid}/ttl", {"ttl_seconds": "7200"})
    assert r.status_code == 404
    assert len(await _audit(dash, "cache.ttl")) == 1


async def test_the_cache_list_filters_and_pages(dash: Dash) -> None:
    await dash.login()
    await dash.post("/admin/tenants", {"name": "acme"})
    await dash.post("/admin/tenants", {"name": "globex"})
    a, g = await _tenant(dash, "acme"), await _tenant(dash, "globex")
    ids = set()
    for i in range(30):
        tid = a.id if i % 2 else g.id
        cls = "cold" if i % 3 == 0 else "standard"
        ids.add(
            await seed_cache(
                dash.db, tid, name=f"c{i:02d}", storage_class=cls, expires_in=timedelta(hours=1 + i)
            )
        )

    def listed(html: str) -> list[str]:
        return re.findall(r'href="/admin/caches/(cache_[0-9a-f]+)"', html)

    first = await dash.client.get("/admin/caches")
    page1 = listed(first.text)
    assert len(page1) == 25
    nxt = re.search(r'href="(/admin/caches\?[^"]*after=[^"]+)"', first.text)
    assert nxt
    page2 = listed((await dash.client.get(nxt.group(1).replace("&amp;", "&"))).text)
    assert len(page2) == 5 and set(page1) | set(page2) == ids

    only_acme = listed((await dash.client.get("/admin/caches?tenant=acme")).text)
    assert len(only_acme) == 15
    cold = listed((await dash.client.get("/admin/caches?class=cold")).text)
    assert len(cold) == 10
    cold_acme = listed((await dash.client.get("/admin/caches?class=cold&tenant=acme")).text)
    assert len(cold_acme) == 5
    assert listed((await dash.client.get("/admin/caches?status=deleted")).text) == []
    assert (await dash.client.get("/admin/caches?tenant=nobody")).status_code == 404
    assert (await dash.client.get("/admin/caches?status=bogus")).status_code == 422


async def test_overview_shows_token_weighted_hit_rate_and_storage(dash: Dash) -> None:
    await dash.login()
    await dash.post("/admin/tenants", {"name": "acme"})
    t = await _tenant(dash, "acme")
    cid = await seed_cache(dash.db, t.id, tokens=1024, stored_bytes=10_000)
    # token-weighted: 900 of 1000 + 0 of 1000 → 45 %, where a count of hits would say 50 %
    await seed_attach(dash.db, t.id, cid, cached=900, prefill=100)
    await seed_attach(dash.db, t.id, cid, cached=0, prefill=1000)
    r = await dash.client.get("/admin")
    assert r.status_code == 200
    # the aggregates load as a fragment until their first result is in
    assert 'hx-get="/admin/overview/economics"' in r.text
    r = await dash.client.get("/admin/overview/economics")
    assert re.search(r'id="hit-rate">45.0 %<', r.text), r.text
    assert re.search(r'id="prefill-saved">900<', r.text)
    by_model = r.text[r.text.index('id="hit-by-model"') :]
    assert re.search(r"<td>tiny</td><td>900</td><td>1,100</td><td>45.0 %</td>", by_model)
    r = await dash.client.get("/admin")
    assert re.search(r'id="hit-rate">45.0 %<', r.text), "the page shows the kept result"
    money = await dash.client.get("/admin/overview/money")
    assert re.search(r'id="revenue">[0-9.]+ [A-Z]{3}<', money.text), money.text
    charts = (await dash.client.get("/admin/overview/charts.json")).json()
    assert charts["storage"]["series"]["redis"][-1] == 10_000
    assert sum(charts["attaches"]["attaches"]) == 2
    usage = (await dash.client.get(f"/admin/tenants/{t.id}/usage.json")).json()
    assert sum(usage["cached_tokens"]) == 900 and sum(usage["prefill_tokens"]) == 1100


async def test_run_invoicing_and_open_the_pdf(dash: Dash) -> None:
    await dash.login()
    await dash.post("/admin/tenants", {"name": "acme"})
    t = await _tenant(dash, "acme")
    last_month = datetime.now(UTC).replace(day=1) - timedelta(days=3)
    cid = await seed_cache(
        dash.db, t.id, tokens=4096, expires_in=timedelta(days=60), created_at=last_month
    )
    await seed_attach(dash.db, t.id, cid, cached=50_000, prefill=5_000, at=last_month)
    period = f"{last_month.year:04d}-{last_month.month:02d}"
    r = await dash.post("/admin/invoices/run", {"period": period}, page="/admin/invoices")
    assert r.status_code == 303
    listing = await dash.client.get(f"/admin/invoices?period={period}")
    inv = re.search(r'href="/admin/invoices/(inv_[0-9a-f]+)\.pdf"', listing.text)
    assert inv, listing.text
    pdf = await dash.client.get(f"/admin/invoices/{inv.group(1)}.pdf")
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    assert pdf.content.startswith(b"%PDF")
    detail = await dash.client.get(f"/admin/invoices/{inv.group(1)}")
    assert "finalized" in detail.text and "acme" in detail.text
    [entry] = await _audit(dash, "invoices.run")
    assert entry.details["created"] == [inv.group(1)]
    # the open month: a draft per tenant with usage, its amount so far
    await seed_attach(dash.db, t.id, cid, cached=1000, prefill=100)
    page = await dash.client.get("/admin/invoices")
    assert 'hx-get="/admin/invoices/drafts"' in page.text
    drafts = await dash.client.get("/admin/invoices/drafts")
    draft_row = r"<td><a [^>]*>acme</a></td><td>(\d{4}-\d{2})</td><td>([^<]+)</td><td>draft</td>"
    row = re.search(draft_row + r"<td>no budget</td>", drafts.text)
    now = datetime.now(UTC)
    assert row and row.group(1) == f"{now.year:04d}-{now.month:02d}", drafts.text
    only = await dash.client.get("/admin/invoices?state=draft")
    assert "<h2>Issued</h2>" not in only.text and 'id="draft-list"' in only.text
    # spend against the budget, once the tenant has one (setting it drops the kept result)
    await dash.post(f"/admin/tenants/{t.id}/budget", {"amount": "1000000"})
    money = await dash.client.get("/admin/overview/money")
    assert re.search(r"<td>[0-9.]+ % of 1000000.00 [A-Z]{3}</td>", money.text), money.text
    # the open month is refused with the service's reason
    now = datetime.now(UTC)
    r = await dash.post(
        "/admin/invoices/run", {"period": f"{now.year:04d}-{now.month:02d}"}, page="/admin/invoices"
    )
    assert r.status_code == 422 and "not over yet" in r.text
    # Stripe is not configured here: the sync says so
    r = await dash.post("/admin/invoices/sync", {"period": period}, page="/admin/invoices")
    assert r.status_code == 503 and "Stripe is not configured" in r.text
