"""The admin API on its own listener (``KVAAS_ADMIN_PORT``): the public application does not
serve ``/admin``, the admin application serves nothing else, and ``kvaas serve`` starts both."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from kvtest.gateway import ADMIN_TOKEN, admin_headers
from pydantic import ValidationError

from kvaas.app import create_admin_app
from kvaas.config import Settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_public_app_leaves_admin_to_the_admin_app(make_app) -> None:  # type: ignore[no-untyped-def]
    async with make_app(tenants=(), admin_port=_free_port()) as api:
        r = await api.client.get("/admin/api/tenants", headers=admin_headers())
        assert r.status_code == 404
        r = await api.client.post("/admin/api/tenants", json={"name": "x"}, headers=admin_headers())
        assert r.status_code == 404
        assert "/admin/api/tenants" not in api.app.openapi()["paths"]

        admin_app = create_admin_app(api.app.state.settings)
        async with admin_app.router.lifespan_context(admin_app):
            transport = httpx.ASGITransport(app=admin_app)
            async with httpx.AsyncClient(transport=transport, base_url="http://admin") as admin:
                r = await admin.post(
                    "/admin/api/tenants", json={"name": "acme"}, headers=admin_headers()
                )
                assert r.status_code == 201, r.text
                key = r.json()["api_key"]["secret"]
                assert (await admin.get("/admin/api/tenants")).status_code == 401
                # the admin listener serves the admin API only
                r = await admin.get("/v1/me", headers={"Authorization": f"Bearer {key}"})
                assert r.status_code == 404
        r = await api.client.get("/v1/me", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json()["tenant_name"] == "acme"


def test_admin_bind_settings() -> None:
    s = Settings(_env_file=None, admin_port=9001)  # type: ignore[call-arg]
    assert s.admin_bind == ("127.0.0.1", 9001)
    assert Settings(_env_file=None).admin_bind is None  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="KVAAS_ADMIN_PORT"):
        Settings(_env_file=None, admin_host="0.0.0.0")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="KVAAS_ADMIN_PORT"):
        Settings(_env_file=None, host="127.0.0.1", port=9000, admin_port=9000)  # type: ignore[call-arg]


def _wait_for(url: str, proc: subprocess.Popen[str], deadline_s: float = 120.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"kvaas serve exited: {proc.communicate()[0]}")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError(f"{url} never answered")


@pytest.mark.slow
def test_kvaas_serve_starts_the_public_and_the_admin_listener(tmp_path: Path) -> None:
    port, admin_port = _free_port(), _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KVAAS_")},
        "KVAAS_ENGINE": "none",
        "KVAAS_DATA_DIR": str(tmp_path / "data"),
        "KVAAS_PORT": str(port),
        "KVAAS_ADMIN_PORT": str(admin_port),
        "KVAAS_ADMIN_TOKEN": ADMIN_TOKEN,
        "COLUMNS": "200",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvaas.cli", "serve"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    public, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    try:
        _wait_for(f"{public}/healthz", proc)
        _wait_for(f"{admin}/admin/api/tenants", proc)
        r = httpx.get(f"{public}/admin/api/tenants", headers=admin_headers())
        assert r.status_code == 404
        r = httpx.post(f"{admin}/admin/api/tenants", json={"name": "acme"}, headers=admin_headers())
        assert r.status_code == 201, r.text
        key = r.json()["api_key"]["secret"]
        r = httpx.get(f"{public}/v1/me", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # both listeners are gone with the command
    for url in (public, admin):
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/healthz", timeout=1.0)
