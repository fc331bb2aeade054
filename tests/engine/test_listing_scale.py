"""Listing stays fast for a tenant with 100k caches: keyset pages off a partial index (no
OFFSET, no COUNT, no sort), checked on the SQL and on PostgreSQL's plans. How fast it is gets
measured in ``bench/gateway.py``, not here."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest
from kvtest.caches import new_client
from sqlalchemy import event, text

from kvaas.services import quotas
from kvaas.services.listing import CacheFilter, encode_cursor

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.postgres]

N = 100_000

INSERT = """
INSERT INTO caches (id, tenant_id, name, model, model_fingerprint, status, version, tokens,
    token_ids, prefix_sha256, chunk_tokens, stored_chunks, stored_bytes, reserved_tokens,
    reserved_bytes, compression, storage_class, metadata, hit_count, ttl_seconds, refresh_on_hit,
    expires_at, created_at, updated_at)
SELECT 'cache_' || substr(md5(:tid || g::text), 1, 24), :tid, 'doc-' || (g % 1000)::text, 'tiny',
    'fp', CASE WHEN g % 20 = 0 THEN 'deleted' WHEN g % 20 = 1 THEN 'failed' ELSE 'ready' END,
    1, 300, decode('00000000', 'hex'), 'sha', 256, 1, 1000, 0, 0, 'int4', 'standard',
    jsonb_build_object('shard', (g % 7)::text), 0, 86400, false,
    now() + interval '1 day',
    -- pairs of rows share a creation time: pages must break ties by id
    now() - make_interval(secs => (g / 2)), now()
FROM generate_series(1, :n) AS g
"""


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    out = [plan]
    for child in plan.get("Plans", ()):
        out += _nodes(child)
    return out


async def test_listing_100k_caches(gateway) -> None:  # type: ignore[no-untyped-def]
    cl = await new_client(gateway)
    db = gateway.app.state.db
    async with db.session() as s:
        await s.execute(text("SET LOCAL statement_timeout = 0"))  # bulk set-up, not the test
        await s.execute(text(INSERT), {"tid": cl.tenant_id, "n": N})
        await s.execute(text("ANALYZE caches"))
        await s.commit()
    live = N - N // 20  # deleted ones are not listed
    try:

        async def page(**params: Any) -> dict[str, Any]:
            r = await cl.request("GET", "/v1/caches", params=params)
            assert r.status_code == 200, r.text
            return r.json()

        # walk 20 pages of 100: strictly ordered, no repeats, ties broken by id
        seen: list[tuple[str, str]] = []
        cursor = None
        for _ in range(20):
            body = await page(limit=100, **({"after": cursor} if cursor else {}))
            seen += [(c["created_at"], c["id"]) for c in body["data"]]
            cursor = body["next_cursor"]
        assert len(seen) == 2000 == len(set(seen))
        key = [(datetime.fromisoformat(t.replace("Z", "+00:00")), i) for t, i in seen]
        assert key == sorted(key, reverse=True)

        # a page deep in the list is a keyset page like the first (its plan is checked below)
        async with db.session() as s:
            mid = (
                await s.execute(
                    text(
                        "SELECT created_at, id FROM caches WHERE tenant_id = :t "
                        "ORDER BY created_at DESC, id DESC OFFSET :o LIMIT 1"
                    ),
                    {"t": cl.tenant_id, "o": live // 2},
                )
            ).one()
        deep = encode_cursor(mid[0].isoformat(), mid[1])
        body = await page(limit=100, after=deep)
        assert len(body["data"]) == 100 and body["has_more"]
        body = await page(limit=100, after=deep, order="asc")
        assert len(body["data"]) == 100

        body = await page(name="doc-7", limit=100)
        assert len(body["data"]) == 100 and not body["has_more"]
        body = await page(name="doc-20", limit=100)
        assert body["data"] == []  # its 100 caches are all deleted
        body = await page(limit=100, **{"metadata[shard]": "3"})
        assert len(body["data"]) == 100
        body = await page(limit=100, status="failed")
        assert {c["status"] for c in body["data"]} == {"failed"}

        # the plans: index range scans of the partial indexes, no sort, no full scan
        service = cl.service
        tenant = await cl.tenant()
        statements: list[tuple[str, Any]] = []

        def capture(_conn, _cursor, statement, parameters, _context, _many):  # type: ignore[no-untyped-def]
            if "FROM caches" in statement and "ORDER BY" in statement:
                statements.append((statement, parameters))

        event.listen(db.engine.sync_engine, "before_cursor_execute", capture)
        try:
            async with db.session() as s:
                await service.list_caches(s, tenant, CacheFilter(limit=100))
                await service.list_caches(s, tenant, CacheFilter(limit=100, after=deep))
                await service.list_caches(s, tenant, CacheFilter(limit=100, name="doc-7"))
        finally:
            event.remove(db.engine.sync_engine, "before_cursor_execute", capture)
        assert len(statements) == 3
        for stmt, _ in statements:
            assert "OFFSET" not in stmt.upper() and "COUNT(" not in stmt.upper(), stmt
        async with db.engine.connect() as conn:
            for (stmt, params), index in zip(
                statements,
                ("ix_caches_tenant_listed", "ix_caches_tenant_listed", "ix_caches_tenant_name"),
                strict=True,
            ):
                raw = await conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + stmt, params)
                doc = raw.scalar_one()
                plan = (json.loads(doc) if isinstance(doc, str) else doc)[0]
                nodes = _nodes(plan["Plan"])
                kinds = [n["Node Type"] for n in nodes]
                assert "Sort" not in kinds and "Seq Scan" not in kinds, kinds
                used = {n.get("Index Name") for n in nodes}
                assert index in used, (kinds, used)
        async with db.session() as s:
            used = await quotas.usage(s, cl.tenant_id)
        assert used.caches == N - 2 * (N // 20) and used.tokens == used.caches * 300
    finally:
        async with db.session() as s:
            await s.execute(text("SET LOCAL statement_timeout = 0"))
            await s.execute(text("DELETE FROM caches WHERE tenant_id = :t"), {"t": cl.tenant_id})
            await s.commit()
