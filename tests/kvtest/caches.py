"""Helpers for the cache lifecycle tests on the session ``gateway`` (tests/engine)."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from kvaas.db.models import Tenant
from kvtest.gateway import admin_headers

_CORPUS: list[int] = []

LOAD_STAGE_COUNT = "kvaas_connector_load_stage_seconds_count"


async def load_stage_count(http: httpx.AsyncClient, stage: str) -> float:
    """How many loads the gateway's ``/metrics`` counts for the connector's ``stage`` (all
    tiers); 0 before the first."""
    text = (await http.get("/metrics")).text
    prefix = f'{LOAD_STAGE_COUNT}{{stage="{stage}",tier="all"}} '
    lines = [ln for ln in text.splitlines() if ln.startswith(prefix)]
    return float(lines[0].removeprefix(prefix)) if lines else 0.0


def corpus_ids(gateway: Any) -> list[int]:
    """Token ids of real text (the standard library's ``os`` module), about 14k of them."""
    if not _CORPUS:
        text = Path(os.__file__).read_text() + Path(os.path.__file__).read_text()
        _CORPUS.extend(gateway.app.state.engine.model.encode(text))
    return _CORPUS


class Client:
    """One tenant's view of the gateway."""

    def __init__(self, gateway: Any, key: str, tenant_id: str) -> None:
        self.gateway = gateway
        self.key = key
        self.tenant_id = tenant_id

    @property
    def http(self) -> httpx.AsyncClient:
        return self.gateway.client

    @property
    def service(self) -> Any:
        return self.gateway.app.state.cache_service

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    async def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        return await self.http.request(method, url, headers=self.headers(), **kw)

    async def create(self, ids: list[int], *, status: int = 201, **kw: Any) -> dict[str, Any]:
        r = await self.request("POST", "/v1/cache/create", json={"token_ids": ids, **kw})
        assert r.status_code == status, r.text
        return r.json()

    async def attach(self, **body: Any) -> httpx.Response:
        body = {"max_tokens": 4, "temperature": 0.0, **body}
        return await self.request("POST", "/v1/cache/attach", json=body)

    async def get(self, cache_id: str) -> httpx.Response:
        return await self.request("GET", f"/v1/caches/{cache_id}")

    async def tenant(self) -> Tenant:
        async with self.gateway.app.state.db.session() as s:
            t = await s.get(Tenant, self.tenant_id)
            assert t is not None
            return t

    async def keys(self, ids: list[int], scheme: str) -> list[bytes]:
        return self.service._keys(await self.tenant(), ids, scheme)

    async def slot(self) -> str:
        return self.service._slot(await self.tenant())

    async def redis_bytes(self) -> int:
        """Bytes of this tenant's chunks in the Redis tier (its own byte counter)."""
        redis = self.service.store.tier("redis")
        name = redis.keys.counter(await self.slot())
        (value,) = await redis.conn.pipelined(lambda p: p.get(name))
        return int(value or 0)

    async def wait_status(
        self, cache_id: str, statuses: tuple[str, ...] = ("ready", "failed"), within_s: float = 120
    ) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + within_s
        while True:
            r = await self.get(cache_id)
            assert r.status_code == 200, r.text
            if r.json()["status"] in statuses:
                return r.json()
            assert asyncio.get_running_loop().time() < deadline, r.text
            await asyncio.sleep(0.1)


async def new_client(gateway: Any, **tenant_fields: Any) -> Client:
    """A fresh tenant (its own namespace, quotas as given) and its API key."""
    name = f"lc-{secrets.token_hex(5)}"
    r = await gateway.client.post(
        "/admin/api/tenants", json={"name": name, **tenant_fields}, headers=admin_headers()
    )
    assert r.status_code == 201, r.text
    body = r.json()
    return Client(gateway, body["api_key"]["secret"], body["tenant"]["id"])


class Gate:
    """Holds the engine's next prefills until opened (patch ``engine.generate`` with it)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.real: Callable[..., Awaitable[Any]] = engine.generate
        self.opened = asyncio.Event()
        self.entered = asyncio.Event()

    async def __call__(self, ids: Any, sampling: Any, plan: Any = None) -> Any:
        if plan is not None and plan.op == "save":
            self.entered.set()
            await self.opened.wait()
        return await self.real(ids, sampling, plan)
