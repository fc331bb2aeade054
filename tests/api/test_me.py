"""``/v1/me`` shows the limits in force: the tenant's own, else the service's defaults."""

from __future__ import annotations

from kvtest.gateway import admin_headers


async def test_me_shows_the_limits_in_force(make_app) -> None:  # type: ignore[no-untyped-def]
    async with make_app(default_storage_quota_tokens=123_456, default_max_caches=7) as api:
        r = await api.client.get("/v1/me", headers=api.auth())
        assert r.status_code == 200, r.text
        me = r.json()
        assert (me["storage_quota_tokens"], me["max_caches"]) == (123_456, 7)
        assert me["storage_quota_bytes"] == api.app.state.settings.default_storage_quota_bytes

        r = await api.client.post(
            "/admin/api/tenants",
            json={"name": "own", "storage_quota_tokens": 1000, "max_caches": 2},
            headers=admin_headers(),
        )
        assert r.status_code == 201, r.text
        key = r.json()["api_key"]["secret"]
        me = (await api.client.get("/v1/me", headers={"Authorization": f"Bearer {key}"})).json()
        assert (me["storage_quota_tokens"], me["max_caches"]) == (1000, 2)

    async with make_app(tenants=("free",), default_storage_quota_tokens="unlimited") as api:
        me = (await api.client.get("/v1/me", headers=api.auth("free"))).json()
        assert me["storage_quota_tokens"] is None  # lifted by the operator: unlimited
