"""The dashboard as an operator uses it: Debian's chromium, headless, driven by Playwright,
against a real gateway (PostgreSQL, Redis, disk tier, the tiny vLLM engine) over HTTP.

One walk through the routine tasks: a wrong token is refused; log in; create a tenant and a
key; create a cache through the API and see it appear; change its TTL; delete it; run
invoicing and open the PDF; a form posted without its CSRF token is refused; log out. Every
page visited is saved as a screenshot (the directory is printed and attached to the report);
with ``KVAAS_DASHBOARD_SCREENSHOTS=<dir>`` the two the README shows are written there too.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from kvtest.dashboard import seed_attach
from kvtest.gateway import ADMIN_TOKEN
from kvtest.serve import serve
from kvtest.services import REDIS_URL, PgSchema

from kvaas.app import create_app
from kvaas.config import Settings

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

CHROMIUM = Path(os.environ.get("KVAAS_CHROMIUM", "/usr/bin/chromium"))
#: The README's two screenshots: (file name, page they show).
PROMPT = Path(os.__file__).read_text()[:5000]  # real text, about 1,200 tokens
README_SHOTS = {"overview": "dashboard-overview.png", "tenant": "dashboard-tenant.png"}


def _require_chromium() -> None:
    """These tests never skip: without the browser they fail and say how to get it."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"the browser tests need Debian's chromium at {CHROMIUM} (or KVAAS_CHROMIUM): "
            "`apt-get install -y chromium` as root; ./scripts/test installs it when it can",
            pytrace=False,
        )


@dataclass
class Served:
    url: str
    app: Any
    tmp: Path


@pytest.fixture(scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    _require_chromium()
    schema = PgSchema()
    tmp = tmp_path_factory.mktemp("dashboard-browser")
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=tmp / "data",
        database_url=schema.url,
        admin_token=ADMIN_TOKEN,
        engine="inprocess",
        model="tiny",
        redis_url=REDIS_URL,
        redis_prefix=f"kvtest-{secrets.token_hex(4)}",
        memory_tier_bytes=64 * 1024 * 1024,
        disk_tier_bytes=1024**3,
        chunk_tokens=256,
        engine_max_model_len=4096,
        engine_max_batched_tokens=1024,
        engine_prefix_caching=False,
        engine_kv_cache_gib=0.5,
        rate_limit_per_second=0,
    )
    app = create_app(settings)
    try:
        async with app.router.lifespan_context(app), serve(app) as url:
            yield Served(url, app, tmp)
    finally:
        schema.drop()


@dataclass
class Shots:
    """Screenshots of every page visited, in a directory the test report names."""

    folder: Path
    readme: Path | None
    taken: list[Path] = field(default_factory=list)

    async def take(self, page: Any, name: str) -> None:
        path = self.folder / f"{len(self.taken) + 1:02d}-{name}.png"
        await page.screenshot(path=str(path), full_page=True)
        self.taken.append(path)
        if self.readme is not None and name in README_SHOTS:
            self.readme.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(self.readme / README_SHOTS[name]), full_page=False)


async def test_an_operator_walks_through_the_dashboard(
    served: Served, record_property: Any
) -> None:
    from playwright.async_api import async_playwright, expect

    shots = Shots(
        # a folder of its own: pytest rotates its numbered temporary folders between runs
        Path(tempfile.mkdtemp(prefix="kvaas-dashboard-screenshots-")),
        Path(os.environ["KVAAS_DASHBOARD_SCREENSHOTS"])
        if os.environ.get("KVAAS_DASHBOARD_SCREENSHOTS")
        else None,
    )
    print(f"\nscreenshots: {shots.folder}")
    record_property("screenshots", str(shots.folder))
    base = served.url
    problems: list[str] = []

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        context = await browser.new_context(viewport={"width": 1400, "height": 900})
        page = await context.new_page()
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        # script errors and CSP violations show in the console; refused requests (the wrong
        # token, the forged form) are checked where they happen, server errors never expected
        page.on(
            "console",
            lambda m: (
                problems.append(f"console: {m.text}")
                if m.type == "error" and not m.text.startswith("Failed to load resource")
                else None
            ),
        )
        page.on(
            "response",
            lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 500 else None,
        )
        try:
            # unauthenticated: every page sends us to the login form
            await page.goto(f"{base}/admin/caches")
            await expect(page).to_have_url(f"{base}/admin/login?next=/admin/caches")
            await shots.take(page, "login")

            # a wrong token is refused
            await page.fill("#token", "wrong-token-wrong-token-wrong-token-0000")
            await page.click("button:has-text('Log in')")
            await expect(page.locator(".error")).to_contain_text("not the admin token")
            await expect(page).to_have_url(f"{base}/admin/login")

            # the right one opens the page asked for; the cookie is HttpOnly, SameSite=Strict
            await page.fill("#token", ADMIN_TOKEN)
            await page.click("button:has-text('Log in')")
            await expect(page).to_have_url(f"{base}/admin/caches")
            [cookie] = [c for c in await context.cookies() if c["name"] == "kvaas_admin"]
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            assert await page.evaluate("document.cookie") == ""  # not readable by scripts

            # create a tenant (its key's secret shown once) and a second key
            await page.click("nav >> text=Tenants")
            await page.fill("#new-name", "browser-co")
            await page.click("button:has-text('Create tenant and key')")
            secret = (await page.inner_text("#new-secret")).strip()
            assert len(secret) > 20
            await page.fill("#key-name", "reporting")
            await page.fill("#key-scopes", "usage:read")
            await page.click("button:has-text('Create key')")
            second = (await page.inner_text("#new-secret")).strip()
            assert second != secret
            await expect(page.locator("table >> text=reporting")).to_be_visible()
            await expect(page).to_have_url(re.compile(r".*/admin/tenants/ten_[0-9a-f]+/keys$"))
            tenant_url = page.url.removesuffix("/keys")

            # a cache created through the API, and attached once
            async with httpx.AsyncClient(base_url=base, timeout=300) as api:
                auth = {"Authorization": f"Bearer {secret}"}
                prompt = PROMPT
                r = await api.post(
                    "/v1/cache/create", json={"prompt": prompt, "name": "handbook"}, headers=auth
                )
                assert r.status_code == 201, r.text
                cache_id = r.json()["id"]
                r = await api.post(
                    "/v1/cache/attach",
                    json={"cache_id": cache_id, "prompt": "\nSummary:", "max_tokens": 4},
                    headers=auth,
                )
                assert r.status_code == 200, r.text
                assert r.json()["cache"]["hit"] is True
                tenant_id = (await api.get("/v1/me", headers=auth)).json()["tenant_id"]

            # usage in the closed month, to invoice (test data written to the ledger)
            last_month = datetime.now(UTC).replace(day=1) - timedelta(days=2)
            for _ in range(3):
                await seed_attach(
                    served.app.state.db,
                    tenant_id,
                    cache_id,
                    cached=2_000_000,
                    prefill=300_000,
                    at=last_month,
                )

            await page.goto(base + "/admin")
            await page.wait_for_selector("#chart-attaches[data-ready='true']")
            await page.wait_for_selector("#chart-storage[data-ready='true']")
            # the aggregates arrive as fragments (htmx) on the first visit
            await expect(page.locator("#hit-rate")).to_contain_text("%", timeout=60_000)
            await expect(page.locator("#revenue")).to_be_visible(timeout=60_000)
            await shots.take(page, "overview")

            await page.goto(tenant_url)
            await page.wait_for_selector("#chart-usage[data-ready='true']")
            await expect(page.locator("text=handbook")).to_be_visible()
            await shots.take(page, "tenant")

            # the cache appears in the list; open it
            await page.click("nav >> text=Caches")
            await page.fill("#f-tenant", "browser-co")
            await page.click("button:has-text('Filter')")
            await expect(page.locator("#caches >> text=handbook")).to_be_visible()
            await shots.take(page, "caches")
            await page.click("#caches >> text=handbook")
            await expect(page).to_have_url(f"{base}/admin/caches/{cache_id}")
            await expect(page.locator("text=Chunks per tier")).to_be_visible()
            await shots.take(page, "cache")

            # change its TTL
            await page.fill("#ttl", "7200")
            await page.click("button:has-text('Set TTL')")
            await expect(page.locator(".notice")).to_contain_text("lifetime is changed")
            await expect(page.locator("#cache-ttl")).to_contain_text("7,200 s")

            # delete it, after the confirmation
            await page.click("text=Delete cache…")
            await expect(page.locator("h1")).to_contain_text("Delete cache handbook")
            await shots.take(page, "confirm-delete")
            await page.click("button:has-text('Delete cache')")
            await expect(page.locator(".notice")).to_contain_text("cache is deleted")
            async with httpx.AsyncClient(base_url=base) as api:
                r = await api.get(
                    f"/v1/caches/{cache_id}", headers={"Authorization": f"Bearer {secret}"}
                )
                assert r.status_code == 404

            # run invoicing for the closed month and open the PDF
            period = f"{last_month.year:04d}-{last_month.month:02d}"
            await page.click("nav >> text=Invoices")
            await page.fill("#run-period", period)
            await page.click("button:has-text('Run invoicing')")
            await expect(page.locator(".notice")).to_contain_text("Invoicing ran")
            await expect(page.locator("#invoices >> text=browser-co")).to_be_visible()
            await shots.take(page, "invoices")
            await page.click("#invoices tbody tr >> nth=0 >> td >> nth=0 >> a")
            await expect(page.locator("#invoice-pdf")).to_be_visible()
            await shots.take(page, "invoice")
            href = await page.get_attribute("#invoice-pdf", "href")
            assert href
            pdf = await page.request.get(base + href)  # the browser's own session
            assert pdf.status == 200 and pdf.headers["content-type"] == "application/pdf"
            assert (await pdf.body()).startswith(b"%PDF")

            # the system page: every component answers
            await page.click("nav >> text=System")
            for name in ("database", "redis", "store", "engine"):
                row = page.locator(f"#components tr:has(th:text-is('{name}'))")
                await expect(row).to_contain_text("ok")
            await expect(page.locator("#audit")).to_contain_text("cache.delete")
            await shots.take(page, "system")

            # a form posted without its CSRF token is refused, and changes nothing
            await page.click("nav >> text=Tenants")
            await page.evaluate(
                "document.querySelector('#create-tenant input[name=csrf_token]').remove()"
            )
            await page.fill("#new-name", "forged-co")
            await page.click("button:has-text('Create tenant and key')")
            await expect(page.locator(".error")).to_contain_text("CSRF")
            await shots.take(page, "csrf-refused")
            await page.goto(base + "/admin/tenants?q=forged")
            await expect(page.locator("text=No tenants match")).to_be_visible()

            # log out: the dashboard is closed again
            await page.click("button:has-text('Log out')")
            await expect(page).to_have_url(f"{base}/admin/login")
            await page.goto(base + "/admin/tenants")
            await expect(page).to_have_url(f"{base}/admin/login?next=/admin/tenants")
        finally:
            await browser.close()

    assert not problems, problems
    assert len(shots.taken) >= 10
    if shots.readme is not None:
        for name in README_SHOTS.values():
            assert (shots.readme / name).stat().st_size > 10_000
