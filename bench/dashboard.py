"""Admin dashboard page timings on seeded data: 100 tenants, 100,000 caches (PostgreSQL).

Seeds a PostgreSQL schema of its own with SQL bulk inserts (test data, the way the services
would leave it): ``--tenants`` tenants with ``--caches`` caches spread evenly (classes hot,
standard, cold; a few pending, failed and deleted), each cache's lifecycle start (40 days ago
for a fifth of them, so the last month has storage to invoice), attach usage (a cached and a
prefilled usage event per attach) spread over the last 14 days, API keys and audit entries.
Then it runs the gateway in-process (``KVAAS_ENGINE=none``), logs in to the dashboard, runs
invoicing for the last closed month through the dashboard (timed as an action), and fetches
each page ``--repeat`` times through the ASGI interface (no network; rendering included).

    python bench/dashboard.py [--quick] [--json PATH]

``--quick``: 10 tenants, 10,000 caches. Prints a table of each page's first (cold) and median
times, and writes them with the seed sizes to ``--json``. For profiling,
``KVAAS_BENCH_SEED_ONLY=1 KVAAS_BENCH_KEEP_SCHEMA=1`` seeds, prints the database URL and keeps
the schema (drop it afterwards).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import re
import secrets
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_URL = os.environ.get(
    "KVAAS_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
ADMIN_TOKEN = "bench-admin-token-0123456789-abcdef"
BATCH = 5000


@contextmanager
def pg_schema() -> Any:
    import psycopg

    name = f"kvaas_bench_{secrets.token_hex(4)}"
    libpq = POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
    try:
        yield f"{POSTGRES_URL}?options={quote(f'-csearch_path={name}')}"
    finally:
        if os.environ.get("KVAAS_BENCH_KEEP_SCHEMA"):  # for profiling: drop it yourself
            print(f"kept schema {name}")
        else:
            with psycopg.connect(libpq, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def seed(db_url: str, tenants: int, caches: int, attaches: int) -> dict[str, Any]:
    """Insert the test data with SQL; returns what was inserted and how long it took."""
    from sqlalchemy import create_engine, text

    from kvaas.db.models import (
        ApiKey,
        AuditLog,
        Cache,
        CacheLifecycleEvent,
        CacheVersion,
        Tenant,
        UsageEvent,
        new_id,
    )
    from kvaas.db.session import sync_url

    t0 = time.perf_counter()
    engine = create_engine(sync_url(db_url))
    now = datetime.now(UTC)
    token_ids = bytes(4 * 8)
    sha = hashlib.sha256(token_ids).hexdigest()
    tenant_ids = [new_id("ten") for _ in range(tenants)]
    classes = ("standard", "standard", "hot", "cold")
    live: list[tuple[str, str]] = []
    counts = {"usage_events": 0, "lifecycle_events": 0, "audit": 0}
    with engine.begin() as conn:
        conn.execute(
            Tenant.__table__.insert(),
            [
                {
                    "id": tid,
                    "name": f"tenant-{i:03d}",
                    "status": "active" if i % 25 else "disabled",
                    "namespace_secret": secrets.token_hex(32),
                    "created_at": now - timedelta(days=90),
                    "updated_at": now,
                }
                for i, tid in enumerate(tenant_ids)
            ],
        )
        conn.execute(
            ApiKey.__table__.insert(),
            [
                {
                    "id": new_id("key"),
                    "tenant_id": tid,
                    "name": "default",
                    "prefix": secrets.token_hex(5),
                    "secret_hash": "0" * 64,
                    "scopes": ["*"],
                    "created_at": now,
                }
                for tid in tenant_ids
            ],
        )
        for start in range(0, caches, BATCH):
            rows, versions, lifecycle = [], [], []
            for i in range(start, min(caches, start + BATCH)):
                tid = tenant_ids[i % tenants]
                cid = new_id("cache")
                status = (
                    "pending"
                    if i % 97 == 1
                    else "failed"
                    if i % 89 == 2
                    else "deleted"
                    if i % 53 == 3
                    else "ready"
                )
                cls = classes[i % 4]
                tokens = 512 * (1 + i % 8)
                created = now - timedelta(days=40 if i % 5 == 0 else i % 13, seconds=i)
                rows.append(
                    {
                        "id": cid,
                        "tenant_id": tid,
                        "name": f"doc-{i}",
                        "model": "tiny" if i % 3 else "qwen-0.5b",
                        "model_fingerprint": "0" * 32,
                        "status": status,
                        "version": 1,
                        "tokens": tokens,
                        "token_ids": token_ids,
                        "prefix_sha256": sha,
                        "chunk_tokens": 256,
                        "stored_chunks": tokens // 256,
                        "stored_bytes": tokens * 600,
                        "compression": "int8",
                        "storage_class": cls,
                        "metadata": {},
                        "hit_count": i % 50,
                        "ttl_seconds": 86400 * 60,
                        "expires_at": now + timedelta(days=1 + i % 60, seconds=i),
                        "created_at": created,
                        "updated_at": now,
                    }
                )
                versions.append(
                    {
                        "cache_id": cid,
                        "version": 1,
                        "status": "ready" if status == "ready" else "deleted",
                        "tokens": tokens,
                        "token_ids": token_ids,
                        "prefix_sha256": sha,
                        "chunks": tokens // 256,
                        "stored_bytes": tokens * 600,
                        "created_at": created,
                    }
                )
                if status in ("ready", "deleted"):
                    lifecycle.append(
                        {
                            "idempotency_key": f"lc:{cid}:started",
                            "tenant_id": tid,
                            "cache_id": cid,
                            "kind": "started",
                            "at": created,
                            "tokens": tokens,
                            "storage_class": cls,
                            "bytes_by_tier": {"disk" if cls == "cold" else "redis": tokens * 600},
                            "reason": None,
                            "recorded_at": created,
                        }
                    )
                    if status == "deleted":
                        lifecycle.append(
                            {
                                "idempotency_key": f"lc:{cid}:ended",
                                "tenant_id": tid,
                                "cache_id": cid,
                                "kind": "ended",
                                "at": created + timedelta(hours=5),
                                "tokens": 0,
                                "storage_class": None,
                                "bytes_by_tier": {},
                                "reason": "deleted",
                                "recorded_at": created,
                            }
                        )
                    else:
                        live.append((tid, cid))
            conn.execute(Cache.__table__.insert(), rows)
            conn.execute(CacheVersion.__table__.insert(), versions)
            conn.execute(CacheLifecycleEvent.__table__.insert(), lifecycle)
            counts["lifecycle_events"] += len(lifecycle)
        for start in range(0, attaches, BATCH):
            events = []
            for i in range(start, min(attaches, start + BATCH)):
                tid, cid = live[(i * 7919) % len(live)]
                at = now - timedelta(seconds=(i * 104729) % (14 * 86400))
                rid = f"bench{i}"
                cached = 4096 if i % 5 else 0
                for meter, qty in (
                    ("cached_tokens", cached),
                    ("prefill_tokens", 64 + (i % 5 == 0) * 4096),
                ):
                    events.append(
                        {
                            "idempotency_key": f"attach:{rid}:{meter}",
                            "public_id": new_id("ue"),
                            "tenant_id": tid,
                            "meter": meter,
                            "quantity": qty,
                            "occurred_at": at,
                            "cache_id": cid,
                            "details": {"op": "attach", "request_id": rid},
                            "recorded_at": at,
                        }
                    )
            conn.execute(UsageEvent.__table__.insert(), events)
            counts["usage_events"] += len(events)
        audit = [
            {
                "at": now - timedelta(minutes=i),
                "actor": "admin-api",
                "action": ("tenant.create", "key.create", "key.revoke")[i % 3],
                "target_type": "tenant",
                "target_id": tenant_ids[i % tenants],
                "tenant_id": tenant_ids[i % tenants],
                "details": {},
            }
            for i in range(10 * tenants)
        ]
        conn.execute(AuditLog.__table__.insert(), audit)
        counts["audit"] = len(audit)
        conn.execute(text("ANALYZE"))
    engine.dispose()
    return {
        "tenants": tenants,
        "caches": caches,
        "live_caches": len(live),
        "attaches": attaches,
        **counts,
        "seed_seconds": round(time.perf_counter() - t0, 1),
    }


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert m, "no CSRF token on the page"
    return m.group(1)


async def timed(client: httpx.AsyncClient, path: str, repeat: int) -> dict[str, Any]:
    times: list[float] = []
    status, size = 0, 0
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        r = await client.get(path)
        times.append((time.perf_counter() - t0) * 1000)
        status, size = r.status_code, len(r.content)
    return {
        "path": path,
        "status": status,
        "bytes": size,
        "first_ms": round(times[0], 1),
        "median_ms": round(statistics.median(times[1:]), 1),
        "max_ms": round(max(times[1:]), 1),
    }


async def measure(db_url: str, repeat: int) -> dict[str, Any]:
    from kvaas.app import create_app
    from kvaas.config import Settings

    data = Path(tempfile.mkdtemp(prefix="kvaas-bench-dashboard-"))
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=data,
        database_url=db_url,
        admin_token=ADMIN_TOKEN,
        engine="none",
        rate_limit_per_second=0,
        unauth_rate_limit_per_second=0,
    )
    app = create_app(settings)
    results: dict[str, Any] = {"pages": [], "actions": []}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://bench.test", timeout=600
        ) as c:
            form = await c.get("/admin/login")
            r = await c.post(
                "/admin/login", data={"token": ADMIN_TOKEN, "csrf_token": _csrf(form.text)}
            )
            assert r.status_code == 303, r.text
            now = datetime.now(UTC)
            last = now.replace(day=1) - timedelta(days=1)
            period = f"{last.year:04d}-{last.month:02d}"
            token = _csrf((await c.get("/admin/invoices")).text)
            t0 = time.perf_counter()
            r = await c.post("/admin/invoices/run", data={"period": period, "csrf_token": token})
            results["actions"].append(
                {
                    "action": f"run invoicing {period}",
                    "status": r.status_code,
                    "ms": round((time.perf_counter() - t0) * 1000, 1),
                }
            )
            tenants_html = (await c.get("/admin/tenants")).text
            tenant = re.search(r'href="/admin/tenants/(ten_[0-9a-f]+)"', tenants_html)
            caches_html = (await c.get("/admin/caches")).text
            cache = re.search(r'href="/admin/caches/(cache_[0-9a-f]+)"', caches_html)
            nxt = re.search(r'href="(/admin/caches\?[^"]*after=[^"]+)"', caches_html)
            inv_html = (await c.get(f"/admin/invoices?period={period}")).text
            invoice = re.search(r'href="/admin/invoices/(inv_[0-9a-f]+)"', inv_html)
            assert tenant and cache and nxt and invoice, "seeded data not listed"
            tid, cid, iid = tenant.group(1), cache.group(1), invoice.group(1)
            pages = [
                ("Login", "/admin/login"),
                ("Overview", "/admin"),
                ("Overview: attach stats", "/admin/overview/economics"),
                ("Overview: revenue", "/admin/overview/money"),
                ("Overview charts (JSON)", "/admin/overview/charts.json"),
                ("Overview, results kept", "/admin"),
                ("Tenants", "/admin/tenants"),
                ("Tenants, search", "/admin/tenants?q=tenant-04"),
                ("Tenant", f"/admin/tenants/{tid}"),
                ("Tenant usage chart (JSON)", f"/admin/tenants/{tid}/usage.json"),
                ("Caches", "/admin/caches"),
                ("Caches, next page", nxt.group(1).replace("&amp;", "&")),
                ("Caches of a tenant", f"/admin/caches?tenant={tid}"),
                ("Caches, class cold", "/admin/caches?class=cold"),
                ("Caches, model + tier", "/admin/caches?model=qwen-0.5b&tier=disk"),
                ("Caches, failed", "/admin/caches?status=failed"),
                ("Cache", f"/admin/caches/{cid}"),
                ("Invoices", "/admin/invoices"),
                ("Invoices of a period", f"/admin/invoices?period={period}"),
                ("Invoice", f"/admin/invoices/{iid}"),
                ("Invoice PDF", f"/admin/invoices/{iid}.pdf"),
                ("System", "/admin/system"),
                ("System health (htmx)", "/admin/system/health"),
            ]
            for name, path in pages:
                row = await timed(c, path, repeat)
                results["pages"].append({"page": name, **row})
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 tenants, 10,000 caches")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--tenants", type=int)
    ap.add_argument("--caches", type=int)
    ap.add_argument("--attaches", type=int, help="attaches in the last 14 days")
    ap.add_argument("--repeat", type=int, help="timed fetches per page after the first")
    args = ap.parse_args()
    tenants = args.tenants or (10 if args.quick else 100)
    caches = args.caches or (10_000 if args.quick else 100_000)
    attaches = args.attaches or (20_000 if args.quick else 200_000)
    repeat = args.repeat or (3 if args.quick else 5)
    from kvaas.db import migrate

    with pg_schema() as url:
        migrate.upgrade(url)
        seeded = seed(url, tenants, caches, attaches)
        if os.environ.get("KVAAS_BENCH_SEED_ONLY"):
            print(url)
            return
        print(
            f"seeded {seeded['tenants']} tenants, {seeded['caches']:,} caches "
            f"({seeded['live_caches']:,} live), {seeded['usage_events']:,} usage events, "
            f"{seeded['lifecycle_events']:,} lifecycle events in {seeded['seed_seconds']} s"
        )
        results = asyncio.run(measure(url, repeat))
    for a in results["actions"]:
        print(f"{a['action']}: HTTP {a['status']} in {a['ms']:,.0f} ms")
    print(
        f"\n{'page':<28} {'status':>6} {'first ms':>9} {'median ms':>10} {'max ms':>8} {'KiB':>7}"
    )
    for p in results["pages"]:
        print(
            f"{p['page']:<28} {p['status']:>6} {p['first_ms']:>9.1f} {p['median_ms']:>10.1f} "
            f"{p['max_ms']:>8.1f} {p['bytes'] / 1024:>7.1f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "bench": "dashboard",
                    "quick": args.quick,
                    "at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                    f"{sys.version.split()[0]}, PostgreSQL (shared test server)",
                    "seeded": seeded,
                    "repeat": repeat,
                    **results,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
