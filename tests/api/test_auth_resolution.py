"""The API key is resolved once per request, through the idempotency middleware or not, with
the same answers and failure counts either way."""

from __future__ import annotations

import pytest
from kvtest.gateway import ADMIN_TOKEN

from kvaas.metrics import AUTH_FAILURES


@pytest.mark.parametrize("idempotent", [False, True])
async def test_a_post_looks_its_key_up_once(make_app, lookups, idempotent: bool) -> None:  # type: ignore[no-untyped-def]
    async with make_app() as api:
        extra = {"Idempotency-Key": "once-1"} if idempotent else {}
        lookups.clear()
        r = await api.client.post("/v1/test/orders", json={"n": 1}, headers=api.auth(**extra))
        assert r.status_code == 201 and r.json()["tenant"] == "acme"
        assert len(lookups) == 1


@pytest.mark.parametrize("idempotent", [False, True])
async def test_a_bad_key_is_refused_and_counted_once(make_app, lookups, idempotent: bool) -> None:  # type: ignore[no-untyped-def]
    async with make_app() as api:
        real = api.keys["acme"]
        wrong = real[:-1] + ("a" if real[-1] != "a" else "b")
        headers = {"Authorization": f"Bearer {wrong}"}
        if idempotent:
            headers["Idempotency-Key"] = "once-2"
        before = AUTH_FAILURES.labels("unknown")._value.get()
        lookups.clear()
        r = await api.client.post("/v1/test/orders", json={"n": 1}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert AUTH_FAILURES.labels("unknown")._value.get() == before + 1
        assert len(lookups) == 1
        assert api.effects.calls == []


async def test_a_disabled_tenant_is_403_through_the_middleware(make_app) -> None:  # type: ignore[no-untyped-def]
    async with make_app() as api:
        r = await api.client.post(
            "/admin/api/tenants/acme/disable", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        assert r.status_code == 200, r.text
        h = api.auth(**{"Idempotency-Key": "once-3"})
        r = await api.client.post("/v1/test/orders", json={"n": 1}, headers=h)
        assert r.status_code == 403 and "'acme' is disabled" in r.json()["error"]["message"]
        assert api.effects.calls == []
