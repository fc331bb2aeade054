"""A known key whose tenant's engine slots and queue are all taken is refused (429
``engine_busy``) before the application reads its request: the body is not parsed, the key is
not looked up. Anything else reaches the application as before."""

from __future__ import annotations

import contextlib
from typing import Any

from kvtest.gateway import ADMIN_TOKEN

from kvaas.services.fairness import FairGate

ENGINE_ROUTES = ["/v1/cache/create", "/v1/cache/attach", "/v1/completions", "/v1/chat/completions"]
NOT_JSON = b"{this is not json"


async def _me(api: Any, tenant: str = "acme") -> str:
    r = await api.client.get("/v1/me", headers=api.auth(tenant))
    assert r.status_code == 200, r.text
    return str(r.json()["tenant_id"])


def _fill(stack: contextlib.ExitStack, gate: FairGate, tenant_id: str) -> None:
    while gate.refusal(tenant_id) is None:
        stack.enter_context(gate.admit(tenant_id))


async def test_a_full_tenant_is_refused_before_its_body_is_read(make_app, lookups) -> None:  # type: ignore[no-untyped-def]
    async with make_app(auth_cache_seconds=60) as api:
        gate = api.app.state.cache_service.gate
        acme = await _me(api)
        await _me(api, "globex")
        lookups.clear()
        with contextlib.ExitStack() as stack:
            _fill(stack, gate, acme)
            for path in ENGINE_ROUTES:
                r = await api.client.post(
                    path,
                    content=NOT_JSON,
                    headers={**api.auth(), "content-type": "application/json"},
                )
                assert r.status_code == 429, (path, r.text)
                assert r.json()["error"]["type"] == "engine_busy" and r.headers["Retry-After"]
                assert r.headers["x-request-id"] == r.json()["error"]["request_id"]
            # another tenant, and a route without the engine, reach the application
            r = await api.client.post(
                "/v1/cache/attach",
                content=NOT_JSON,
                headers={**api.auth("globex"), "content-type": "application/json"},
            )
            assert r.status_code == 422, r.text
            assert (await api.client.get("/v1/me", headers=api.auth())).status_code == 200
        assert lookups == []  # every key was known: nothing was looked up
        # once a slot is free the same request reaches the application (and its body check)
        r = await api.client.post(
            "/v1/cache/attach",
            content=NOT_JSON,
            headers={**api.auth(), "content-type": "application/json"},
        )
        assert r.status_code == 422, r.text


async def test_an_unknown_key_goes_on_to_the_application(make_app) -> None:  # type: ignore[no-untyped-def]
    """Without a remembered key nothing is refused early: the application authenticates."""
    async with make_app(auth_cache_seconds=0) as api:
        gate = api.app.state.cache_service.gate
        acme = await _me(api)
        with contextlib.ExitStack() as stack:
            _fill(stack, gate, acme)
            r = await api.client.post(
                "/v1/cache/attach",
                content=NOT_JSON,
                headers={**api.auth(), "content-type": "application/json"},
            )
            assert r.status_code == 422, r.text  # the application read it
            bad = api.keys["acme"][:-1] + ("a" if api.keys["acme"][-1] != "a" else "b")
            r = await api.client.post(
                "/v1/cache/attach", json={}, headers={"Authorization": f"Bearer {bad}"}
            )
            assert r.status_code == 401, r.text


async def test_a_key_without_the_routes_scope_is_refused_for_its_scope(make_app) -> None:  # type: ignore[no-untyped-def]
    """An early refusal never hides a missing scope: the application answers 403."""
    async with make_app(auth_cache_seconds=60) as api:
        r = await api.client.post(
            "/admin/api/tenants/acme/keys",
            json={"name": "reader", "scopes": ["usage:read"]},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        assert r.status_code == 201, r.text
        reader = {"Authorization": f"Bearer {r.json()['secret']}"}
        me = await api.client.get("/v1/me", headers=reader)  # now remembered
        assert me.status_code == 200, me.text
        with contextlib.ExitStack() as stack:
            _fill(stack, api.app.state.cache_service.gate, me.json()["tenant_id"])
            r = await api.client.post("/v1/cache/attach", json={}, headers=reader)
            assert r.status_code == 403, r.text
            r = await api.client.post("/v1/cache/attach", json={}, headers=api.auth())
            assert r.status_code == 429, r.text
