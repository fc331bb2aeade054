"""With a separate admin listener (``KVAAS_ADMIN_PORT``) the dashboard lives there, beside the
admin API, and the public port does not serve it."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
from kvtest.dashboard import Dash, seed_cache
from kvtest.gateway import ADMIN_TOKEN, running_app
from sqlalchemy import select

from kvaas.app import create_admin_app
from kvaas.db.models import Tenant


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_the_dashboard_follows_the_admin_api_to_its_listener(
    database_url: str, tmp_path: Path
) -> None:
    values = {
        "data_dir": tmp_path / "data",
        "database_url": database_url,
        "admin_token": ADMIN_TOKEN,
        "admin_port": _free_port(),
    }
    async with running_app(None, **values) as (app, public):
        assert (await public.get("/admin/login")).status_code == 404
        assert (await public.get("/admin")).status_code == 404
        admin_app = create_admin_app(app.state.settings)
        async with admin_app.router.lifespan_context(admin_app):
            transport = httpx.ASGITransport(app=admin_app)
            async with httpx.AsyncClient(transport=transport, base_url="http://admin") as c:
                dash = Dash(c, admin_app)
                assert (await c.get("/admin")).status_code == 303
                assert (await dash.login()).status_code == 303
                for path in ("/admin", "/admin/tenants", "/admin/caches", "/admin/system"):
                    r = await c.get(path)
                    assert r.status_code == 200, (path, r.text[:300])
                r = await dash.post("/admin/tenants", {"name": "acme"})
                assert r.status_code == 200
                async with dash.db.session() as s:
                    t = (await s.scalars(select(Tenant).where(Tenant.name == "acme"))).one()
                cid = await seed_cache(dash.db, t.id)
                assert (await c.get(f"/admin/caches/{cid}")).status_code == 200
                # no store here: the cache actions say where to go instead
                r = await dash.post(f"/admin/caches/{cid}/ttl", {"ttl_seconds": "7200"})
                assert r.status_code == 503 and "gateway" in r.text
