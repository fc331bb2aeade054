"""``GET /v1/usage`` and ``/v1/usage/events``: the running meters, bucketed, tenant-scoped."""

from __future__ import annotations

from kvaas.db.session import Database


async def test_usage_buckets_and_events(db: Database, make_keyed_tenant, seed, make_app) -> None:
    (t, key), (_o, other) = await make_keyed_tenant("acme"), await make_keyed_tenant("globex")
    await seed(t.id)  # Oct 5, 10:00-13:00: 100k tokens standard, 20 attaches 10:05-10:24
    async with make_app() as (_app, client):
        auth = {"Authorization": f"Bearer {key}"}
        q = {"from": "2026-10-05T09:00:00Z", "to": "2026-10-05T14:00:00Z", "granularity": "hour"}
        r = await client.get("/v1/usage", params=q, headers=auth)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["from"].startswith("2026-10-05T09:00:00")
        hours = [b["storage_token_seconds"]["standard"] for b in body["buckets"]]
        assert hours == [0, 100_000 * 3600, 100_000 * 3600, 100_000 * 3600, 0]
        assert [b["cached_tokens"] for b in body["buckets"]] == [0, 2_000_000, 0, 0, 0]
        assert body["totals"]["prefill_tokens"] == 110_000
        assert body["totals"]["cache_creations"] == 1
        day = await client.get(
            "/v1/usage",
            params={"from": "2026-10-01T00:00:00Z", "to": "2026-11-01T00:00:00Z"},
            headers=auth,
        )
        assert len(day.json()["buckets"]) == 31
        assert day.json()["totals"] == body["totals"]
        ev = await client.get(
            "/v1/usage/events", params={"meter": "cached_tokens", "limit": 15}, headers=auth
        )
        page = ev.json()
        assert len(page["data"]) == 15 and page["has_more"]
        rest = await client.get(
            "/v1/usage/events",
            params={"meter": "cached_tokens", "after": page["data"][-1]["id"]},
            headers=auth,
        )
        assert len(rest.json()["data"]) == 5 and not rest.json()["has_more"]
        theirs = await client.get(
            "/v1/usage", params=q, headers={"Authorization": f"Bearer {other}"}
        )
        assert theirs.json()["totals"]["cached_tokens"] == 0
        bad = await client.get(
            "/v1/usage", params={**q, "to": "2026-10-05T08:00:00Z"}, headers=auth
        )
        assert bad.status_code == 400
        many = await client.get(
            "/v1/usage",
            params={
                "from": "2020-01-01T00:00:00Z",
                "to": "2026-01-01T00:00:00Z",
                "granularity": "hour",
            },
            headers=auth,
        )
        assert many.status_code == 400 and many.json()["error"]["param"] == "granularity"
