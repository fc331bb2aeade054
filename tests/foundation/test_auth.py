"""API keys, tenants and the admin API, on SQLite and PostgreSQL."""

from __future__ import annotations

import httpx
from kvtest.gateway import admin_headers, new_tenant
from sqlalchemy import create_engine, text

from kvaas.db.session import sync_url


def _same_error(a: httpx.Response, b: httpx.Response) -> bool:
    ea, eb = a.json()["error"], b.json()["error"]
    return {k: v for k, v in ea.items() if k != "request_id"} == {
        k: v for k, v in eb.items() if k != "request_id"
    }


async def test_key_authenticates_and_resolves_tenant(client: httpx.AsyncClient) -> None:
    tenant, key = await new_tenant(client, "acme")
    r = await client.get("/v1/me", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    me = r.json()
    assert me["tenant_id"] == tenant["id"]
    assert me["tenant_name"] == "acme"
    assert key not in r.text  # the secret is never echoed back


async def test_unknown_revoked_malformed_missing_keys_are_indistinguishable(
    client: httpx.AsyncClient,
) -> None:
    _tenant, key = await new_tenant(client, "acme")
    prefix = key.split("_")[1]
    unknown = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    r = await client.delete(f"/admin/api/keys/{prefix}", headers=admin_headers())
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    responses = [
        await client.get("/v1/me", headers={"Authorization": f"Bearer {k}"})
        for k in (key, unknown, "not-a-key", "kvs_short_x")
    ]
    responses.append(await client.get("/v1/me"))
    assert all(r.status_code == 401 for r in responses), [r.status_code for r in responses]
    assert all(_same_error(responses[0], r) for r in responses[1:])
    assert responses[0].json()["error"]["type"] == "authentication_error"


async def test_disabled_tenant_gets_403_and_recovers(client: httpx.AsyncClient) -> None:
    _tenant, key = await new_tenant(client, "acme")
    auth = {"Authorization": f"Bearer {key}"}
    r = await client.post("/admin/api/tenants/acme/disable", headers=admin_headers())
    assert r.status_code == 200 and r.json()["status"] == "disabled"
    r = await client.get("/v1/me", headers=auth)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    r = await client.post("/admin/api/tenants/acme/enable", headers=admin_headers())
    assert (await client.get("/v1/me", headers=auth)).status_code == 200


async def test_secret_is_not_stored_in_clear(client: httpx.AsyncClient, database_url: str) -> None:
    _tenant, key = await new_tenant(client, "acme")
    secret = key.split("_", 2)[2]
    engine = create_engine(sync_url(database_url))
    try:
        with engine.connect() as conn:
            dump = []
            for table in ("tenants", "api_keys", "audit_log"):
                for row in conn.execute(text(f"SELECT * FROM {table}")):
                    dump.append(" ".join(str(v) for v in row))
    finally:
        engine.dispose()
    blob = "\n".join(dump)
    assert blob  # the rows are there
    assert secret not in blob and key not in blob


async def test_admin_api_requires_the_admin_token(client: httpx.AsyncClient) -> None:
    r = await client.get("/admin/api/tenants")
    assert r.status_code == 401
    r = await client.get("/admin/api/tenants", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    # a tenant's API key is not an admin token
    _t, key = await new_tenant(client, "acme")
    r = await client.get("/admin/api/tenants", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 401


async def test_admin_api_disabled_without_token(make_client) -> None:  # type: ignore[no-untyped-def]
    async with make_client(admin_token=None) as (_app, c):
        r = await c.get("/admin/api/tenants", headers=admin_headers())
        assert r.status_code == 403
        assert "KVAAS_ADMIN_TOKEN" in r.json()["error"]["message"]


async def test_admin_tenant_and_key_lifecycle(client: httpx.AsyncClient) -> None:
    h = admin_headers()
    t1, _ = await new_tenant(client, "acme")
    await new_tenant(client, "globex")
    r = await client.post("/admin/api/tenants", json={"name": "acme"}, headers=h)
    assert r.status_code == 409 and r.json()["error"]["param"] == "name"
    r = await client.post("/admin/api/tenants", json={"name": "Not Valid!"}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["param"] == "name"
    names = [t["name"] for t in (await client.get("/admin/api/tenants", headers=h)).json()["data"]]
    assert names == ["acme", "globex"]
    assert (await client.get(f"/admin/api/tenants/{t1['id']}", headers=h)).json()["name"] == "acme"
    assert (await client.get("/admin/api/tenants/nobody", headers=h)).status_code == 404

    r = await client.post(
        "/admin/api/tenants/acme/keys", json={"name": "ci", "scopes": ["caches:read"]}, headers=h
    )
    assert r.status_code == 201, r.text
    new_key = r.json()
    assert new_key["secret"].startswith("kvs_") and new_key["scopes"] == ["caches:read"]
    r = await client.post("/admin/api/tenants/acme/keys", json={"scopes": ["root"]}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["param"] == "scopes"
    listed = (await client.get("/admin/api/tenants/acme/keys", headers=h)).json()["data"]
    assert [k["name"] for k in listed] == ["default", "ci"]
    assert all("secret" not in k for k in listed)
    r = await client.delete(f"/admin/api/keys/{new_key['id']}", headers=h)
    assert r.status_code == 200
    again = await client.delete(f"/admin/api/keys/{new_key['id']}", headers=h)
    assert again.json()["revoked_at"] == r.json()["revoked_at"]  # idempotent
    assert (await client.delete("/admin/api/keys/key_nope", headers=h)).status_code == 404

    audit = (await client.get("/admin/api/audit", headers=h)).json()["data"]
    actions = [a["action"] for a in reversed(audit)]
    assert actions == ["tenant.create", "tenant.create", "key.create", "key.revoke"]
    assert all(a["actor"] == "admin-api" and a["request_id"] for a in audit)


async def test_last_used_at_is_recorded(client: httpx.AsyncClient) -> None:
    _t, key = await new_tenant(client, "acme")
    h = admin_headers()
    before = (await client.get("/admin/api/tenants/acme/keys", headers=h)).json()["data"][0]
    assert before["last_used_at"] is None
    await client.get("/v1/me", headers={"Authorization": f"Bearer {key}"})
    after = (await client.get("/admin/api/tenants/acme/keys", headers=h)).json()["data"][0]
    assert after["last_used_at"] is not None
