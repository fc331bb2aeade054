"""Helpers for talking to a test gateway."""

from __future__ import annotations

from typing import Any

import httpx

ADMIN_TOKEN = "test-admin-token-0123456789"


def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def new_tenant(client: httpx.AsyncClient, name: str = "acme") -> tuple[dict[str, Any], str]:
    """Create a tenant through the admin API; returns (tenant json, api key)."""
    r = await client.post("/admin/api/tenants", json={"name": name}, headers=admin_headers())
    assert r.status_code == 201, r.text
    body = r.json()
    return body["tenant"], body["api_key"]["secret"]
