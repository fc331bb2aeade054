"""The gateway remembers a key that authenticated for ``auth_cache_seconds``, and forgets it
the moment the key is revoked, its tenant disabled or its limits changed in this process; a
change made elsewhere (another gateway, straight in the database) holds within the TTL."""

from __future__ import annotations

import asyncio

import pytest
from kvtest.gateway import ADMIN_TOKEN
from sqlalchemy import update

from kvaas.auth.cache import AuthCache
from kvaas.auth.resolver import AuthContext
from kvaas.auth.tenancy import Actor, set_tenant_limits
from kvaas.db.base import utcnow
from kvaas.db.models import ApiKey, Tenant

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.mark.parametrize("idempotent", [False, True])
async def test_a_key_is_looked_up_once_within_the_ttl(make_app, lookups, idempotent: bool) -> None:  # type: ignore[no-untyped-def]
    async with make_app(auth_cache_seconds=30) as api:
        lookups.clear()
        for i in range(5):
            extra = {"Idempotency-Key": f"k-{i}"} if idempotent else {}
            r = await api.client.post("/v1/test/orders", json={"n": i}, headers=api.auth(**extra))
            assert r.status_code == 201, r.text
        assert len(lookups) == 1
        r = await api.client.get("/v1/me", headers=api.auth("globex"))
        assert r.status_code == 200 and len(lookups) == 2  # each key has its own entry


async def test_zero_turns_the_cache_off(make_app, lookups) -> None:  # type: ignore[no-untyped-def]
    async with make_app(auth_cache_seconds=0) as api:
        lookups.clear()
        for _ in range(3):
            assert (await api.client.get("/v1/me", headers=api.auth())).status_code == 200
        assert len(lookups) == 3


async def test_a_revoked_key_is_refused_at_once(make_app) -> None:  # type: ignore[no-untyped-def]
    async with make_app(auth_cache_seconds=60) as api:
        assert (await api.client.get("/v1/me", headers=api.auth())).status_code == 200
        prefix = api.keys["acme"].split("_")[1]
        r = await api.client.delete(f"/admin/api/keys/{prefix}", headers=ADMIN)
        assert r.status_code == 200, r.text
        r = await api.client.get("/v1/me", headers=api.auth())
        assert r.status_code == 401, r.text
        h = api.auth(**{"Idempotency-Key": "after-revoke"})
        r = await api.client.post("/v1/test/orders", json={"n": 1}, headers=h)
        assert r.status_code == 401 and api.effects.calls == []


async def test_a_disabled_tenant_is_refused_at_once_and_limits_apply_at_once(make_app) -> None:  # type: ignore[no-untyped-def]
    async with make_app(auth_cache_seconds=60) as api:
        assert (await api.client.get("/v1/me", headers=api.auth())).status_code == 200
        async with api.app.state.db.session() as s:  # as the dashboard does
            await set_tenant_limits(
                s,
                Actor("test", None),
                "acme",
                storage_quota_tokens=None,
                storage_quota_bytes=None,
                max_caches=7,
            )
        me = (await api.client.get("/v1/me", headers=api.auth())).json()
        assert me["max_caches"] == 7, me
        r = await api.client.post("/admin/api/tenants/acme/disable", headers=ADMIN)
        assert r.status_code == 200, r.text
        r = await api.client.get("/v1/me", headers=api.auth())
        assert r.status_code == 403, r.text


async def test_a_revocation_elsewhere_holds_within_the_ttl(make_app) -> None:  # type: ignore[no-untyped-def]
    """Revoked by another process (here: straight in the database), the key keeps working on
    this gateway until its entry expires, and not a moment longer than the TTL."""
    async with make_app(auth_cache_seconds=0.5) as api:
        assert (await api.client.get("/v1/me", headers=api.auth())).status_code == 200
        prefix = api.keys["acme"].split("_")[1]
        async with api.app.state.db.session() as s:
            await s.execute(
                update(ApiKey).where(ApiKey.prefix == prefix).values(revoked_at=utcnow())
            )
            await s.commit()
        assert (await api.client.get("/v1/me", headers=api.auth())).status_code == 200
        await asyncio.sleep(0.6)
        assert (await api.client.get("/v1/me", headers=api.auth())).status_code == 401


def test_a_lookup_that_raced_a_clear_is_not_kept_and_entries_are_bounded() -> None:
    cache = AuthCache(ttl_s=60, max_entries=2)
    ctx = AuthContext(tenant=Tenant(id="ten_a", name="a"), key=ApiKey(id="key_a", scopes=["*"]))
    began = cache.generation
    cache.clear()  # a revocation while the lookup was under way
    cache.put("kvs_a", ctx, began)
    assert cache.get("kvs_a") is None
    cache.put("kvs_a", ctx, cache.generation)
    assert cache.get("kvs_a") is ctx
    cache.put("kvs_b", ctx)
    cache.put("kvs_c", ctx)  # over max_entries: the least recently used goes
    assert cache.get("kvs_a") is None and len(cache) == 2
