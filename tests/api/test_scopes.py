"""Key scopes are enforced per route, deny by default.

Every route that takes an API key declares the scope it needs; a key without it gets ``403
permission_error`` naming the scope before any work is done (so a gateway without an engine
answers 403, not 503). A route that declares no scope stops start-up, and is refused at
request time should it be added later.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from kvtest.gateway import ADMIN_TOKEN, admin_headers, new_tenant, running_app

from kvaas.api.deps import Auth
from kvaas.api.scopes import api_key_routes, scope_table_markdown
from kvaas.auth.tenancy import KNOWN_SCOPES

ROOT = Path(__file__).resolve().parents[2]

#: The scope each route needs (``None``: any valid key).
EXPECTED: dict[tuple[str, str], str | None] = {
    ("GET", "/v1/me"): None,
    ("POST", "/v1/cache/create"): "caches:write",
    ("POST", "/v1/cache/attach"): "caches:write",
    ("POST", "/v1/cache/estimate"): "caches:read",
    ("GET", "/v1/caches"): "caches:read",
    ("GET", "/v1/caches/{cache_id}"): "caches:read",
    ("PATCH", "/v1/caches/{cache_id}"): "caches:write",
    ("DELETE", "/v1/caches/{cache_id}"): "caches:write",
    ("POST", "/v1/caches/{cache_id}/extend"): "caches:write",
    ("GET", "/v1/caches/{cache_id}/versions"): "caches:read",
    ("DELETE", "/v1/caches/{cache_id}/versions/{version}"): "caches:write",
    ("PUT", "/v1/tags/{tag}"): "caches:write",
    ("GET", "/v1/tags"): "caches:read",
    ("GET", "/v1/tags/{tag}"): "caches:read",
    ("DELETE", "/v1/tags/{tag}"): "caches:write",
    ("POST", "/v1/chat/completions"): "caches:write",
    ("POST", "/v1/completions"): "caches:write",
    ("GET", "/v1/models"): "caches:read",
    ("GET", "/v1/usage"): "usage:read",
    ("GET", "/v1/usage/events"): "usage:read",
    ("GET", "/v1/invoices"): "invoices:read",
    ("GET", "/v1/invoices/{invoice_id}"): "invoices:read",
    ("GET", "/v1/invoices/{invoice_id}.pdf"): "invoices:read",
    ("GET", "/v1/invoices/{invoice_id}.html"): "invoices:read",
    ("GET", "/v1/budget"): "invoices:read",
    ("PUT", "/v1/budget"): "budget:write",
}
KEY_SCOPES = [s for s in KNOWN_SCOPES if s != "*"]
PATH_VALUES = {
    "cache_id": "cache_0123456789abcdef01234567",
    "version": "1",
    "tag": "latest",
    "invoice_id": "inv_0123",
}


def _url(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: PATH_VALUES[m.group(1)], path)


@pytest.fixture(scope="module")
async def scoped(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient, dict[str, str]]]:
    """An app without an engine (on SQLite: scopes do not depend on the database), one key per
    scope and a ``*`` key."""
    tmp = tmp_path_factory.mktemp("scopes")
    async with running_app(
        data_dir=tmp,
        database_url=f"sqlite+aiosqlite:///{tmp / 'kvaas.db'}",
        admin_token=ADMIN_TOKEN,
        rate_limit_per_second=0,
    ) as (app, client):
        _t, star = await new_tenant(client, "scoped")
        keys = {"*": star}
        for scope in KEY_SCOPES:
            r = await client.post(
                "/admin/api/tenants/scoped/keys",
                json={"name": scope, "scopes": [scope]},
                headers=admin_headers(),
            )
            assert r.status_code == 201, r.text
            keys[scope] = r.json()["secret"]
        yield app, client, keys


async def test_every_api_key_route_declares_its_scope(scoped) -> None:  # type: ignore[no-untyped-def]
    app, _client, _keys = scoped
    declared = {(method, path): scope for method, path, scope in api_key_routes(app)}
    assert declared == EXPECTED


def test_budget_write_is_a_known_scope() -> None:
    assert "budget:write" in KNOWN_SCOPES


@pytest.mark.parametrize("key_scope", ["*", *KEY_SCOPES])
@pytest.mark.parametrize(("method", "path"), sorted(EXPECTED))
async def test_route_allows_or_refuses_by_scope(  # type: ignore[no-untyped-def]
    scoped, method: str, path: str, key_scope: str
) -> None:
    _app, client, keys = scoped
    needed = EXPECTED[(method, path)]
    body = {} if method in ("POST", "PUT", "PATCH") else None
    r = await client.request(
        method, _url(path), json=body, headers={"Authorization": f"Bearer {keys[key_scope]}"}
    )
    if needed is None or key_scope in ("*", needed):
        assert r.status_code != 403, r.text
        assert r.status_code != 401, r.text
    else:
        assert r.status_code == 403, r.text
        err = r.json()["error"]
        assert err["type"] == "permission_error"
        assert f"`{needed}`" in err["message"]


async def test_a_refused_scope_does_no_work(scoped) -> None:  # type: ignore[no-untyped-def]
    """A read-only key cannot create a cache, delete one, re-point a tag or set a budget; the
    budget stays as it was."""
    _app, client, keys = scoped
    read = {"Authorization": f"Bearer {keys['caches:read']}"}
    r = await client.put("/v1/budget", json={"amount": "5.00", "currency": "USD"}, headers=read)
    assert r.status_code == 403
    r = await client.get("/v1/budget", headers={"Authorization": f"Bearer {keys['*']}"})
    assert r.status_code == 200 and r.json()["amount_minor"] is None


def _unscoped_router() -> APIRouter:
    router = APIRouter(prefix="/v1/unscoped")

    @router.get("/thing")
    async def unscoped_thing(auth: Auth) -> dict[str, str]:
        return {"tenant": auth.tenant.name}

    return router


async def test_a_route_without_a_scope_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="/v1/unscoped/thing"):
        async with running_app(
            lambda app: app.include_router(_unscoped_router()),
            data_dir=tmp_path,
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'kvaas.db'}",
        ):
            pass


async def test_a_route_added_after_start_up_without_a_scope_is_refused(scoped) -> None:  # type: ignore[no-untyped-def]
    app, client, keys = scoped
    app.include_router(_unscoped_router())
    r = await client.get("/v1/unscoped/thing", headers={"Authorization": f"Bearer {keys['*']}"})
    assert r.status_code == 403
    assert r.json()["error"]["type"] == "permission_error"


def test_docs_show_the_scope_table(scoped) -> None:  # type: ignore[no-untyped-def]
    app, _client, _keys = scoped
    table = scope_table_markdown(app)
    assert table in (ROOT / "docs" / "api.md").read_text(), (
        "docs/api.md is stale: put this table in it:\n" + table
    )
