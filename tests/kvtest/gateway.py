"""Helpers for talking to a test gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI

from kvaas.app import create_app
from kvaas.config import Settings

ADMIN_TOKEN = "test-admin-token-0123456789abcdefghijkl"


def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def new_tenant(client: httpx.AsyncClient, name: str = "acme") -> tuple[dict[str, Any], str]:
    """Create a tenant through the admin API; returns (tenant json, api key)."""
    r = await client.post("/admin/api/tenants", json={"name": name}, headers=admin_headers())
    assert r.status_code == 201, r.text
    body = r.json()
    return body["tenant"], body["api_key"]["secret"]


@asynccontextmanager
async def serving(
    settings: Settings,
    prepare: Callable[[FastAPI], None] | None = None,
    request_timeout_s: float | None = None,
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """``settings``' app with its lifespan running and an in-process HTTP client to it
    (``request_timeout_s`` seconds per request; ``None``: httpx's default). ``prepare(app)``
    runs before start-up (e.g. to add a test router)."""
    app = create_app(settings)
    if prepare is not None:
        prepare(app)
    kwargs: dict[str, Any] = {} if request_timeout_s is None else {"timeout": request_timeout_s}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://kvaas.test", **kwargs
        ) as client:
            yield app, client


@asynccontextmanager
async def running_app(
    prepare: Callable[[FastAPI], None] | None = None, **values: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """An app built from the settings ``values`` (no engine unless one is named), its lifespan
    running, and an in-process HTTP client to it. ``prepare(app)`` runs before start-up (e.g.
    to add a test router)."""
    settings = Settings(_env_file=None, **{"engine": "none", **values})  # type: ignore[call-arg]
    async with serving(settings, prepare) as (app, c):
        yield app, c
