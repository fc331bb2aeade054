"""Fixtures for gateway tests without an engine: an app on a real database (SQLite and
PostgreSQL), with extra routes that have observable side effects, and tenants with keys."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from kvtest.gateway import ADMIN_TOKEN, new_tenant, running_app

from kvaas.api.deps import Auth, require_scope
from kvaas.db.repositories import ApiKeyRepository


@dataclass
class SideEffects:
    """What the test routes did: every call they served, by route."""

    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)


def side_effect_router(effects: SideEffects) -> APIRouter:
    """POST routes standing for any route another part of the product adds (any valid key
    may call them)."""
    router = APIRouter(prefix="/v1/test", dependencies=[require_scope(None)])

    @router.post("/orders", status_code=201)
    async def create_order(request: Request, auth: Auth) -> JSONResponse:
        body = await request.json()
        effects.calls.append(("orders", body))
        n = len(effects.calls)
        return JSONResponse(
            {"order": n, "tenant": auth.tenant.name, "body": body},
            status_code=201,
            headers={"Location": f"/v1/test/orders/{n}"},
        )

    @router.post("/slow")
    async def slow(auth: Auth) -> dict[str, int]:
        effects.calls.append(("slow", {}))
        effects.entered.set()
        await effects.release.wait()
        return {"done": len(effects.calls)}

    @router.post("/flaky")
    async def flaky(auth: Auth) -> JSONResponse:
        effects.calls.append(("flaky", {}))
        return JSONResponse({"error": {"type": "service_unavailable", "message": "x"}}, 503)

    @router.post("/stream")
    async def stream(auth: Auth) -> StreamingResponse:
        effects.calls.append(("stream", {}))

        async def events() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"data: {i}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return router


@dataclass
class ApiApp:
    app: FastAPI
    client: httpx.AsyncClient
    effects: SideEffects
    keys: dict[str, str]

    def auth(self, tenant: str = "acme", **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[tenant]}", **extra}


AppFactory = Callable[..., AbstractAsyncContextManager[ApiApp]]


@pytest.fixture
def make_app(database_url: str, tmp_path: Path) -> AppFactory:
    """``async with make_app(**settings) as api``: an app (engine none) with tenants
    ``acme`` and ``globex``; by default without rate limits."""

    @asynccontextmanager
    async def factory(
        tenants: tuple[str, ...] = ("acme", "globex"), **overrides: Any
    ) -> AsyncIterator[ApiApp]:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "database_url": database_url,
            "admin_token": ADMIN_TOKEN,
            "rate_limit_per_second": 0,
        }
        effects = SideEffects()

        def prepare(app: FastAPI) -> None:
            app.include_router(side_effect_router(effects))

        async with running_app(prepare, **{**values, **overrides}) as (app, c):
            keys = {}
            for name in tenants:
                _t, keys[name] = await new_tenant(c, name)
            yield ApiApp(app, c, effects, keys)

    return factory


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Prefixes looked up by the API-key resolver, in order."""
    seen: list[str] = []
    original = ApiKeyRepository.get_with_tenant

    async def counting(self: ApiKeyRepository, prefix: str) -> Any:
        seen.append(prefix)
        return await original(self, prefix)

    monkeypatch.setattr(ApiKeyRepository, "get_with_tenant", counting)
    return seen
