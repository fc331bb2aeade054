"""Metadata cost per request: the PostgreSQL rows and row writes of one cache create and of one
attach, measured on a real gateway (for the sizing note in ``docs/sizing.md``).

Runs the gateway app in this process (the ``tiny`` model on the in-process engine, PostgreSQL
in a throw-away schema, Redis under a private key prefix), creates one tenant, then
``--creates`` caches of 512 tokens and ``--attaches`` attaches of them (8 new tokens each), and
reads PostgreSQL's per-table counters (``pg_stat_user_tables``: rows inserted, updated,
deleted; live rows) around each phase. Background jobs run as in production, so their writes
during the phase are counted too.

    python bench/sizing_rows.py [--quick] [--json PATH] [--database-url URL] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

ADMIN = "sizing-admin-token-0123456789abcdefghij"
#: an idle server process reports its table counters within 10 s (PGSTAT_IDLE_INTERVAL)
FLUSH_S = 11.0


def _counters(libpq_url: str, schema: str) -> dict[str, dict[str, int]]:
    import psycopg

    with psycopg.connect(libpq_url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        rows = conn.execute(
            "SELECT relname, n_tup_ins, n_tup_upd, n_tup_del, n_live_tup "
            "FROM pg_stat_user_tables WHERE schemaname = %s",
            (schema,),
        ).fetchall()
    return {r[0]: {"ins": r[1], "upd": r[2], "del": r[3], "live": r[4]} for r in rows}


def _delta(
    a: dict[str, dict[str, int]], b: dict[str, dict[str, int]], n: int
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for table, after in b.items():
        before = a.get(table, {"ins": 0, "upd": 0, "del": 0, "live": 0})
        d = {k: (after[k] - before[k]) / n for k in ("ins", "upd", "del", "live")}
        if any(d.values()):
            out[table] = {k: round(v, 3) for k, v in d.items()}
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    import psycopg

    from kvaas.app import create_app
    from kvaas.config import Settings

    schema = f"kvaas_sizing_{secrets.token_hex(4)}"
    libpq = args.database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in args.database_url else "?"
    url = f"{args.database_url}{sep}options={quote(f'-csearch_path={schema}')}"
    try:
        settings = Settings(
            _env_file=None,
            data_dir=Path(tempfile.mkdtemp(prefix="kvaas-sizing-")),
            database_url=url,
            admin_token=ADMIN,
            engine="inprocess",
            model="tiny",
            redis_url=args.redis_url,
            redis_prefix=f"sizing-{secrets.token_hex(4)}",
            chunk_tokens=256,
            engine_prefix_caching=False,
            engine_kv_cache_gib=0.5,
        )
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://kvaas", timeout=300
            ) as c:
                r = await c.post(
                    "/admin/api/tenants",
                    json={"name": "sizing"},
                    headers={"Authorization": f"Bearer {ADMIN}"},
                )
                r.raise_for_status()
                auth = {"Authorization": f"Bearer {r.json()['api_key']['secret']}"}
                await asyncio.sleep(FLUSH_S)
                c0 = _counters(libpq, schema)
                ids = []
                for i in range(args.creates):
                    tokens = [(i * 7919 + j * 31) % 4000 + 50 for j in range(512)]
                    r = await c.post("/v1/cache/create", json={"token_ids": tokens}, headers=auth)
                    assert r.status_code == 201, r.text
                    ids.append(r.json()["id"])
                await asyncio.sleep(FLUSH_S)
                c1 = _counters(libpq, schema)
                for i in range(args.attaches):
                    body = {
                        "cache_id": ids[i % len(ids)],
                        "token_ids": [100 + i] * 8,
                        "max_tokens": 1,
                    }
                    r = await c.post("/v1/cache/attach", json=body, headers=auth)
                    assert r.status_code == 200, r.text
                await asyncio.sleep(FLUSH_S)
                c2 = _counters(libpq, schema)
    finally:
        with psycopg.connect(libpq, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    return {
        "per_create": _delta(c0, c1, args.creates),
        "per_attach": _delta(c1, c2, args.attaches),
        "creates": args.creates,
        "attaches": args.attaches,
        "cache_tokens": 512,
        "database": "postgresql",
    }


def _total(per: dict[str, dict[str, float]]) -> tuple[float, float]:
    writes = sum(v["ins"] + v["upd"] + v["del"] for v in per.values())
    rows = sum(v["live"] for v in per.values())
    return writes, rows


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 creates, 20 attaches")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--creates", type=int)
    ap.add_argument("--attaches", type=int)
    ap.add_argument("--database-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = ap.parse_args()
    args.creates = args.creates or (5 if args.quick else 20)
    args.attaches = args.attaches or (20 if args.quick else 100)
    doc = asyncio.run(run(args))
    print(f"{'request':<8} {'table':<24} {'ins':>6} {'upd':>6} {'del':>6} {'rows':>6}")
    for op in ("per_create", "per_attach"):
        for table, v in sorted(doc[op].items()):
            print(
                f"{op[4:]:<8} {table:<24} {v['ins']:>6} {v['upd']:>6} {v['del']:>6} {v['live']:>6}"
            )
        writes, rows = _total(doc[op])
        print(
            f"{op[4:]:<8} {'(all tables)':<24} {'':>6} {'':>6} {'':>6} {rows:>6}  "
            f"writes {writes:.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
