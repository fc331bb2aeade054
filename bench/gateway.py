"""Gateway overhead: requests/s and latency of cheap API calls, beside a bare FastAPI app.

Runs the gateway (``KVAAS_ENGINE=none``, PostgreSQL in a schema of its own, no rate limit)
and a bare FastAPI app with one empty endpoint, both served by uvicorn (one worker) in
processes of their own, and drives each from a separate load process (an httpx async client
with ``--concurrency`` connections) for ``--duration`` seconds per scenario:

- ``bare``: ``GET /ping`` on the bare app (the floor: uvicorn + FastAPI doing nothing);
- ``get_cache``: ``GET /v1/caches/{id}`` (auth + one cache row);
- ``list_caches``: ``GET /v1/caches?limit=20`` (first page, 1k caches in the tenant);
- ``auth_failure``: ``GET /v1/caches/{id}`` with an unknown API key (401).

Then listing time against the tenant's size: the first page (``limit=20``) and a page deep
in the listing (following ``next_cursor``), with 1k and with 100k caches in one tenant
(``--quick``: 20k). Cache rows are inserted directly with SQL.

    python bench/gateway.py [--quick] [--json PATH]

The load generator and both servers share this machine's cores: the numbers compare the
gateway with the bare app measured the same way, not with a dedicated load rig.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from fastapi import FastAPI

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_URL = os.environ.get(
    "KVAAS_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
ADMIN_TOKEN = "bench-admin-token-0123456789-abcdef"

#: The bare app the gateway is compared with (served by uvicorn as ``gateway:bare_app``).
bare_app = FastAPI()


@bare_app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}


# --- load generation (runs in its own process) --------------------------------------------------
async def _load(url: str, headers: dict[str, str], concurrency: int, duration: float) -> dict:
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30, headers=headers) as client:
        # warm up the connections
        await asyncio.gather(*(client.get(url) for _ in range(concurrency)))
        deadline = time.perf_counter() + duration

        async def worker() -> None:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                r = await client.get(url)
                latencies.append(time.perf_counter() - t0)
                statuses[r.status_code] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n,
        "rps": n / elapsed,
        "p50_ms": 1000 * latencies[n // 2],
        "p99_ms": 1000 * latencies[min(n - 1, int(n * 0.99))],
        "statuses": {str(k): v for k, v in statuses.items()},
    }


def run_load(url: str, headers: dict[str, str], concurrency: int, duration: float) -> dict:
    """Drive ``url`` from a separate process; its measurements."""
    cmd = [
        sys.executable,
        __file__,
        "_load",
        url,
        json.dumps(headers),
        str(concurrency),
        str(duration),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- servers and data -----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def uvicorn_server(app: str, env: dict[str, str], *, factory: bool = False, app_dir: Path = ROOT):
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
        "--app-dir",
        str(app_dir),
    ]
    if factory:
        cmd.append("--factory")
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"{app} exited with {proc.returncode}")
            try:
                if httpx.get(url + ("/healthz" if factory else "/ping"), timeout=1).status_code:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def pg_schema():
    import psycopg

    name = f"kvaas_bench_{secrets.token_hex(4)}"
    libpq = POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
    try:
        yield f"{POSTGRES_URL}?options={quote(f'-csearch_path={name}')}"
    finally:
        with psycopg.connect(libpq, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def insert_caches(db_url: str, tenant_id: str, n: int) -> list[str]:
    """``n`` ready caches (and their version rows) for ``tenant_id``, inserted with SQL."""
    import hashlib

    from sqlalchemy import create_engine

    from kvaas.db.base import utcnow
    from kvaas.db.models import Cache, CacheVersion, new_id
    from kvaas.db.session import sync_url

    engine = create_engine(sync_url(db_url))
    now = utcnow()
    token_ids = bytes(4 * 512)
    sha = hashlib.sha256(token_ids).hexdigest()
    ids: list[str] = []
    try:
        with engine.begin() as conn:
            for start in range(0, n, 5000):
                rows, versions = [], []
                for i in range(start, min(n, start + 5000)):
                    cid = new_id("cache")
                    ids.append(cid)
                    rows.append(
                        {
                            "id": cid,
                            "tenant_id": tenant_id,
                            "name": f"doc-{i}",
                            "model": "tiny",
                            "model_fingerprint": "0" * 32,
                            "status": "ready",
                            "version": 1,
                            "tokens": 512,
                            "token_ids": token_ids,
                            "prefix_sha256": sha,
                            "chunk_tokens": 256,
                            "stored_chunks": 2,
                            "stored_bytes": 1 << 20,
                            "compression": "int4",
                            "storage_class": "standard",
                            "meta": {},
                            "hit_count": 0,
                            "expires_at": now + timedelta(days=7),
                            "created_at": now - timedelta(microseconds=n - i),
                            "updated_at": now,
                        }
                    )
                    versions.append(
                        {
                            "cache_id": cid,
                            "version": 1,
                            "status": "ready",
                            "tokens": 512,
                            "token_ids": token_ids,
                            "prefix_sha256": sha,
                            "chunks": 2,
                            "stored_bytes": 1 << 20,
                            "created_at": now,
                        }
                    )
                conn.execute(Cache.__table__.insert(), rows)
                conn.execute(CacheVersion.__table__.insert(), versions)
    finally:
        engine.dispose()
    return ids


def new_tenant(url: str, name: str) -> tuple[str, str]:
    r = httpx.post(
        url + "/admin/api/tenants",
        json={"name": name},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=30,
    )
    r.raise_for_status()
    body = r.json()
    return body["tenant"]["id"], body["api_key"]["secret"]


def listing_times(url: str, key: str, samples: int) -> dict[str, float]:
    """Median latency of the first page, and of a page 50 pages deep (cursor)."""
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as c:

        def timed(params: dict[str, Any]) -> tuple[float, dict]:
            t0 = time.perf_counter()
            r = c.get("/v1/caches", params=params)
            dt = time.perf_counter() - t0
            r.raise_for_status()
            return dt, r.json()

        timed({"limit": 20})
        first = statistics.median(timed({"limit": 20})[0] for _ in range(samples))
        cursor = None
        for _ in range(50):
            _dt, page = timed({"limit": 20, "after": cursor, "cursor": cursor})
            cursor = page.get("next_cursor")
        deep = statistics.median(
            timed({"limit": 20, "after": cursor, "cursor": cursor})[0] for _ in range(samples)
        )
    return {"first_page_ms": 1000 * first, "page_51_ms": 1000 * deep}


# --- the run ---------------------------------------------------------------------------------
@dataclass
class Row:
    scenario: str
    target: str
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    statuses: dict[str, int]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (< 1 minute)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--duration", type=float, help="seconds per scenario")
    ap.add_argument("--big", type=int, help="caches in the big tenant (100k; quick: 20k)")
    args = ap.parse_args()
    duration = args.duration or (3.0 if args.quick else 15.0)
    big = args.big or (20_000 if args.quick else 100_000)
    small = 1_000
    rows: list[Row] = []
    listing: dict[str, dict[str, float]] = {}
    started = time.perf_counter()

    with pg_schema() as db_url, tempfile.TemporaryDirectory() as tmp:
        env = {
            "KVAAS_ENGINE": "none",
            "KVAAS_DATABASE_URL": db_url,
            "KVAAS_DATA_DIR": tmp,
            "KVAAS_ADMIN_TOKEN": ADMIN_TOKEN,
            "KVAAS_RATE_LIMIT_PER_SECOND": "0",
            "KVAAS_LOG_LEVEL": "warning",
        }
        with uvicorn_server("kvaas.app:create_app", env, factory=True) as url:
            small_tenant, small_key = new_tenant(url, "bench-small")
            big_tenant, big_key = new_tenant(url, "bench-big")
            cache_ids = insert_caches(db_url, small_tenant, small)
            good = {"Authorization": f"Bearer {small_key}"}
            bad = {"Authorization": "Bearer kvs_0000000000_" + "x" * 40}
            scenarios = [
                ("get_cache", f"{url}/v1/caches/{cache_ids[0]}", good),
                ("list_caches", f"{url}/v1/caches?limit=20", good),
                ("auth_failure", f"{url}/v1/caches/{cache_ids[0]}", bad),
            ]
            for name, target, headers in scenarios:
                res = run_load(target, headers, args.concurrency, duration)
                rows.append(Row(name, "gateway", **res))
            listing[f"{small:,}"] = listing_times(url, small_key, 5 if args.quick else 20)
            insert_caches(db_url, big_tenant, big)
            listing[f"{big:,}"] = listing_times(url, big_key, 5 if args.quick else 20)
        with uvicorn_server("gateway:bare_app", {}, app_dir=ROOT / "bench") as bare_url:
            res = run_load(f"{bare_url}/ping", {}, args.concurrency, duration)
            rows.insert(0, Row("bare", "FastAPI, no work", **res))

    report(rows, listing, args.concurrency, duration)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "concurrency": args.concurrency,
                    "duration_s": duration,
                    "quick": args.quick,
                    "cpus": os.cpu_count(),
                    "throughput": [asdict(r) for r in rows],
                    "listing": listing,
                    "wall_s": round(time.perf_counter() - started, 1),
                },
                indent=2,
            )
            + "\n"
        )


def report(rows: list[Row], listing: dict[str, dict[str, float]], conc: int, dur: float) -> None:
    from rich.console import Console
    from rich.table import Table

    bare = rows[0].rps
    t = Table(title=f"Gateway throughput ({conc} concurrent clients, {dur:g} s each)")
    for col in ("scenario", "served by", "req/s", "vs bare", "p50 ms", "p99 ms", "statuses"):
        t.add_column(col, justify="left" if col in ("scenario", "served by") else "right")
    for r in rows:
        t.add_row(
            r.scenario,
            r.target,
            f"{r.rps:,.0f}",
            f"{r.rps / bare:.2f}",
            f"{r.p50_ms:.1f}",
            f"{r.p99_ms:.1f}",
            " ".join(f"{k}:{v}" for k, v in sorted(r.statuses.items())),
        )
    lt = Table(title="Listing time by tenant size (GET /v1/caches?limit=20, median)")
    for col in ("caches in tenant", "first page ms", "page 51 ms"):
        lt.add_column(col, justify="right")
    for size, v in listing.items():
        lt.add_row(size, f"{v['first_page_ms']:.1f}", f"{v['page_51_ms']:.1f}")
    console = Console()
    console.print(t)
    console.print(lt)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_load":
        _url, _headers, _conc, _dur = sys.argv[2:6]
        print(json.dumps(asyncio.run(_load(_url, json.loads(_headers), int(_conc), float(_dur)))))
    else:
        sys.path.insert(0, str(ROOT))
        main()
