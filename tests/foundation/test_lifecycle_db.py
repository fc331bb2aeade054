"""The cache lifecycle's database side on SQLite and PostgreSQL, without an engine: listing
with cursors and filters, patch, versions, tags (the upsert), delete, quota usage. The engine
paths (create, extend, attach) are tested in tests/engine."""

from __future__ import annotations

from datetime import timedelta

from kvtest.gateway import new_tenant

from kvaas.db.base import utcnow
from kvaas.db.models import Cache, CacheVersion
from kvaas.services import quotas
from kvaas.services.caches import tokens_to_bytes


async def _seed(app, tenant_id: str, n: int) -> list[tuple]:  # type: ignore[no-untyped-def]
    """``n`` ready caches (version 1, a second version on the first): their (created_at, id)
    in the order made; the first two share a creation time."""
    now = utcnow()
    ids = []
    async with app.state.db.session() as s:
        for i in range(n):
            at = now - timedelta(seconds=n - i - (1 if i == 1 else 0))  # 0 and 1 tie
            c = Cache(
                tenant_id=tenant_id,
                name="even" if i % 2 == 0 else "odd",
                model="tiny",
                model_fingerprint="f" * 32,
                status="ready",
                version=1,
                tokens=300,
                token_ids=tokens_to_bytes(range(300)),
                prefix_sha256="0" * 64,
                chunk_tokens=256,
                stored_chunks=1,
                stored_bytes=1000,
                scheme="int4",
                storage_class="standard",
                meta={"i": str(i), "team": "x" if i < 3 else "y"},
                hit_count=0,
                ttl_seconds=3600,
                expires_at=now + timedelta(hours=1),
                created_at=at,
            )
            s.add(c)
            await s.flush()
            for v in (1, 2) if i == 0 else (1,):
                s.add(
                    CacheVersion(
                        cache_id=c.id,
                        version=v,
                        status="ready",
                        tokens=300 * v,
                        token_ids=tokens_to_bytes(range(300 * v)),
                        prefix_sha256="0" * 64,
                        chunks=v,
                        stored_bytes=1000 * v,
                        created_at=at,
                    )
                )
            ids.append((at, c.id))
        await s.commit()
    return ids


async def test_lifecycle_without_engine(make_client) -> None:  # type: ignore[no-untyped-def]
    async with make_client() as (app, client):
        tenant, key = await new_tenant(client, "acme")
        _other, other_key = await new_tenant(client, "globex")
        h = {"Authorization": f"Bearer {key}"}
        seeded = await _seed(app, tenant["id"], 5)
        ids = [cid for _, cid in seeded]

        def desc(*which: int) -> list[str]:  # pages are ordered by (created_at, id)
            return [cid for _, cid in sorted((seeded[i] for i in which), reverse=True)]

        newest_first = desc(0, 1, 2, 3, 4)
        async with app.state.db.session() as s:
            used = await quotas.usage(s, tenant["id"])
        assert (used.caches, used.tokens, used.bytes) == (5, 1500, 5000)

        async def walk(**params):  # type: ignore[no-untyped-def]
            out, cursor = [], None
            while True:
                q = {**params, **({"after": cursor} if cursor else {})}
                r = await client.get("/v1/caches", params=q, headers=h)
                assert r.status_code == 200, r.text
                out += [c["id"] for c in r.json()["data"]]
                cursor = r.json()["next_cursor"]
                if cursor is None:
                    return out

        assert await walk() == newest_first
        assert await walk(limit=1) == newest_first
        assert await walk(limit=2, order="asc") == newest_first[::-1]
        assert await walk(name="odd", limit=1) == desc(1, 3)
        assert await walk(**{"metadata[team]": "x"}, limit=2) == desc(0, 1, 2)
        assert await walk(metadata_key="i", metadata_value="4") == [ids[4]]
        r = await client.get("/v1/caches", headers={"Authorization": f"Bearer {other_key}"})
        assert r.json()["data"] == []

        # patch
        url = f"/v1/caches/{ids[0]}"
        r = await client.patch(
            url,
            json={"name": "n", "metadata": {}, "ttl_seconds": 600, "refresh_on_hit": True},
            headers=h,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["name"], body["metadata"], body["ttl_seconds"]) == ("n", {}, 600)
        assert body["refresh_on_hit"] is True and body["progress"]["tokens_done"] == 300

        # tags: the upsert, on both databases
        for target in (ids[0], ids[1]):
            r = await client.put("/v1/tags/t1", json={"cache_id": target}, headers=h)
            assert r.status_code == 200 and r.json()["cache_id"] == target
        r = await client.get("/v1/tags", headers=h)
        assert [(t["name"], t["cache_id"]) for t in r.json()["data"]] == [("t1", ids[1])]
        assert await walk(tag="t1") == [ids[1]]
        assert (await client.get(f"/v1/caches/{ids[1]}", headers=h)).json()["tags"] == ["t1"]

        # versions
        r = await client.get(f"{url}/versions", headers=h)
        assert [v["version"] for v in r.json()["data"]] == [1, 2]
        r = await client.delete(f"{url}/versions/1", headers=h)
        assert r.status_code == 200 and r.json()["status"] == "deleted"
        r = await client.delete(f"{url}/versions/2", headers=h)
        assert r.status_code == 409

        # the engine paths answer 503 without an engine
        r = await client.post(f"{url}/extend", json={"prompt": "x"}, headers=h)
        assert r.status_code == 503 and r.json()["error"]["type"] == "engine_unavailable"

        # delete: gone from get, list and tags
        r = await client.delete(f"/v1/caches/{ids[1]}", headers=h)
        assert r.status_code == 200 and r.json()["status"] == "deleted"
        assert (await client.get(f"/v1/caches/{ids[1]}", headers=h)).status_code == 404
        assert ids[1] not in await walk()
        assert (await client.get("/v1/tags/t1", headers=h)).status_code == 404
        async with app.state.db.session() as s:
            assert (await quotas.usage(s, tenant["id"])).caches == 4
