"""The admin API: an empty configured token disables it, an empty presented credential never
matches, and a request without ``Authorization`` never gets in."""

from __future__ import annotations

import pytest
from fastapi.security import HTTPAuthorizationCredentials
from kvtest.gateway import ADMIN_TOKEN
from pydantic import SecretStr
from starlette.requests import Request

from kvaas.api.deps import require_admin
from kvaas.config import Settings
from kvaas.errors import APIError

NO_CREDENTIAL: list[dict[str, str]] = [
    {},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": "Bearer    "},
    {"Authorization": ""},
]


@pytest.mark.parametrize("configured", ["", "   "])
async def test_a_blank_admin_token_disables_the_admin_api(make_app, configured: str) -> None:  # type: ignore[no-untyped-def]
    async with make_app(tenants=(), admin_token=configured) as api:
        for headers in [*NO_CREDENTIAL, {"Authorization": f"Bearer {ADMIN_TOKEN}"}]:
            r = await api.client.post("/admin/api/tenants", json={"name": "x"}, headers=headers)
            assert r.status_code == 403, (headers, r.text)
            assert "disabled" in r.json()["error"]["message"]
        r = await api.client.get("/admin/api/tenants")
        assert r.status_code == 403


async def test_no_credential_never_gets_in(make_app) -> None:  # type: ignore[no-untyped-def]
    async with make_app(tenants=()) as api:
        for headers in NO_CREDENTIAL:
            r = await api.client.post("/admin/api/tenants", json={"name": "x"}, headers=headers)
            assert r.status_code == 401, (headers, r.text)
        r = await api.client.get("/admin/api/tenants", headers={"Authorization": "Basic Og=="})
        assert r.status_code == 401
        r = await api.client.get(
            "/admin/api/tenants", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        assert r.status_code == 200 and r.json()["data"] == []


@pytest.mark.parametrize("presented", [None, ""])
async def test_an_empty_credential_never_matches_even_an_empty_token(presented: str | None) -> None:
    """Defence in depth: settings built without validation still never let an empty
    credential through."""
    settings = Settings.model_construct(admin_token=SecretStr(""))
    request = Request({"type": "http", "headers": [], "state": {}})
    credentials = (
        None
        if presented is None
        else HTTPAuthorizationCredentials(scheme="Bearer", credentials=presented)
    )
    with pytest.raises(APIError) as e:
        await require_admin(request, settings, credentials)
    assert e.value.status_code in (401, 403)
